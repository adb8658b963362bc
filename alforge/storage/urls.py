"""Store URLs: references that keep a password out of campaign files, and redaction for display.

A campaign's ``store:`` may be a SQLAlchemy URL or a reference to one:

* ``$env:NAME`` — the URL is the value of the environment variable ``NAME``;
* ``$secret:NAME`` — the URL is the value of the Prefect Secret block ``NAME`` (read through
  Prefect, imported only for this form, so the store itself still needs no Prefect).

The resolved URL is used only to connect. Everything shown, logged or stored
(:attr:`Store.url`, error messages, the campaign's stored config) is :func:`redact_url`'s form, or
the unresolved reference.

:func:`open_engine` connects; with ``create=False`` (read-only commands) it refuses a database that
is not already an alforge store instead of creating one, so a mistyped URL is named, not migrated.
PostgreSQL's driver, psycopg, is the ``alforge[postgres]`` extra: a ``postgresql://`` (or
``postgres://``) URL without a driver means psycopg (SQLAlchemy's own default, psycopg2, is not what alforge installs), and a
PostgreSQL URL where psycopg is missing is one line naming the extra.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import Engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from alforge.storage.schema import make_engine

POSTGRES_EXTRA = "pip install 'alforge[postgres]'"
ENV_REFERENCE = "$env:"
SECRET_REFERENCE = "$secret:"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# user:password@ in anything URL-shaped, for text SQLAlchemy cannot parse
_USERINFO = re.compile(r"(//[^/:@]*:)[^@/]*@")


class StoreError(ValueError):
    """A store that cannot be opened; the message names its URL without the password."""


def is_reference(url: str) -> bool:
    return url.startswith((ENV_REFERENCE, SECRET_REFERENCE))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (references are returned as they are)."""
    if is_reference(url):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return _USERINFO.sub(r"\1***@", url)


def check_store_reference(url: str) -> None:
    """Raise :class:`StoreError` for a malformed reference, an unset variable or a URL that
    SQLAlchemy cannot parse (a Secret block is read only when the store is opened)."""
    for prefix in (ENV_REFERENCE, SECRET_REFERENCE):
        if url.startswith(prefix) and not _NAME.fullmatch(url[len(prefix):]):
            raise StoreError(f"{url!r}: expected {prefix}NAME with NAME letters, digits, '_', '.', '-'")
    if url.startswith(ENV_REFERENCE) and url[len(ENV_REFERENCE):] not in os.environ:
        raise StoreError(f"{url}: environment variable {url[len(ENV_REFERENCE):]!r} is not set")
    if not url.startswith(SECRET_REFERENCE):
        _parsed(resolve_store_url(url), url)


def resolve_store_url(url: str) -> str:
    """The SQLAlchemy URL that ``url`` (a URL or a reference) stands for."""
    if url.startswith(ENV_REFERENCE):
        name = url[len(ENV_REFERENCE):]
        if name not in os.environ:
            raise StoreError(f"store {url}: environment variable {name!r} is not set")
        return os.environ[name]
    if url.startswith(SECRET_REFERENCE):
        name = url[len(SECRET_REFERENCE):]
        from prefect.blocks.system import Secret

        try:
            return str(Secret.load(name).get())
        except Exception as exc:  # noqa: BLE001 - any failure to read the block has one meaning here
            raise StoreError(f"store {url}: Prefect Secret block {name!r} cannot be read ({type(exc).__name__})") from None
    return url


def _parsed(resolved: str, shown: str) -> None:
    try:
        make_url(resolved)
    except (ArgumentError, ValueError):
        raise StoreError(
            f"store {redact_url(shown)}: not a SQLAlchemy URL (e.g. sqlite:////path/to/file.db or "
            "postgresql+psycopg://user@host/db)"
        ) from None


def open_engine(url: str, *, create: bool = True) -> tuple[Engine, str]:
    """An engine for ``url`` (a URL or a reference) and the redacted URL to show for it.

    Connects once, so an unreachable server or a wrong password is a :class:`StoreError` here rather
    than a traceback later. ``create=False`` also refuses a missing SQLite file (connecting would
    create it) and a database without alforge's tables.
    """
    resolved = resolve_store_url(url)
    _parsed(resolved, url)
    parsed = make_url(resolved)
    shown = redact_url(resolved)
    if not create and parsed.get_backend_name() == "sqlite":
        database = parsed.database or ":memory:"
        if database == ":memory:" or not Path(database).is_file():
            raise StoreError(f"store {shown}: no such database file {database!r}; check --store/--config")
    if parsed.drivername in ("postgresql", "postgres"):  # postgres://: Heroku's and docker images' spelling
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        engine = make_engine(parsed)
    except ImportError as exc:  # SQLAlchemy imports the driver when it builds the engine
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if parsed.get_driver_name() == "psycopg":
            raise StoreError(f"store {shown}: PostgreSQL stores need the psycopg driver ({reason}); {POSTGRES_EXTRA}") from None
        raise StoreError(f"store {shown}: the database driver is not installed ({reason})") from None
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        if parsed.password:
            reason = reason.replace(parsed.password, "***")
        raise StoreError(f"store {shown}: cannot connect: {reason}") from None
    if not create and not {"alembic_version", "campaigns"} <= tables:
        engine.dispose()
        raise StoreError(f"store {shown}: not an alforge store (it has no alforge tables); check the URL")
    return engine, shown
