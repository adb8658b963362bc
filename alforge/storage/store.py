"""High-level access to the store: one method per unit of work, each its own transaction.

Tasks call these methods and never build queries themselves, so every persistence rule (dedup,
label state machine, feature keys) lives here once. Each method that opens a session is a
``@unit_of_work`` (:mod:`alforge.storage.transactions`): re-run whole when the database aborts its
transaction (serialization failure, deadlock, a connection lost mid-statement), so a new method
must also do all its work in the session it opens and nothing outside the database before it ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from alforge.storage import arrays, models
from alforge.storage.atoms_codec import atoms_to_columns, canonical_hash, columns_to_atoms
from alforge.storage.model_files import ModelFileError, verified_model_file
from alforge.storage.schema import upgrade
from alforge.storage.transactions import unit_of_work
from alforge.storage.urls import open_engine

_STRUCTURE_COLUMNS = (
    models.Structure.id,
    models.Structure.n_atoms,
    models.Structure.numbers,
    models.Structure.positions,
    models.Structure.cell,
    models.Structure.pbc,
    models.Structure.info_json,
    models.Structure.arrays_npz,
)


@dataclass(frozen=True)
class LabelRecord:
    """What a finished (or failed) labelling attempt left behind, ready to store."""

    status: str  # done | failed
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    failure_class: str | None = None
    error: str | None = None
    output_tail: str | None = None
    wall_time: float | None = None
    host: str | None = None
    code_version: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class ModelInfo:
    id: int
    iteration_index: int
    path: str
    train_ids: np.ndarray
    metrics: dict[str, Any]
    parent_model_id: int | None = None
    #: SHA-256 of the file at ``path`` when it was stored (None: stored before hashes were recorded)
    sha256: str | None = None


@dataclass(frozen=True)
class TrainingErrors:
    """A model's per-sample training errors (:meth:`Store.put_training_errors`): ``forces``
    (n_atoms × columns) and ``energy`` (n_structures × columns), rows in the order of
    ``structure_ids`` (the training split; ``atom_counts`` atoms each); ``form`` ``epochs`` (one
    column per epoch) or ``quantiles`` (each row's error quantiles over ``n_epochs`` epochs);
    ``forces_last``/``energy_last`` the final epoch's errors."""

    structure_ids: np.ndarray
    atom_counts: np.ndarray
    forces: np.ndarray
    energy: np.ndarray
    forces_last: np.ndarray
    energy_last: np.ndarray
    n_epochs: int
    form: str


#: Default lifetime (s) of a campaign lease and of the label claims made under it; the owner's
#: heartbeat renews both well before they run out (:mod:`alforge.ownership`).
LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class LeaseInfo:
    """Who owns a campaign: the owner id of the run, where it runs, since when, until when."""

    campaign_id: int
    owner: str
    host: str
    pid: int
    acquired_at: datetime
    heartbeat_at: datetime
    expires_at: datetime


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC), PostgreSQL aware ones: compare them as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _lease_info(row: models.CampaignLease) -> LeaseInfo:
    return LeaseInfo(
        row.campaign_id, row.owner, row.host, row.pid,
        _utc(row.acquired_at), _utc(row.heartbeat_at), _utc(row.expires_at),
    )


def _ids(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i8").copy()


#: Structures per query when feature arrays are read or replaced: a bounded batch of blobs per round
#: trip (900 × ~32 KB for a 32-atom structure at d = 128) and below SQLite's bound-parameter limit.
FEATURE_CHUNK = 900
#: The feature-blob query of :meth:`Store._feature_blobs` as psycopg runs it in binary format.
_PG_FEATURE_BLOBS = (
    f"SELECT structure_id, data, dtype, shape FROM {models.Feature.__tablename__} "
    "WHERE model_id = %s AND kind = %s AND structure_id = ANY(%s)"
)


def _psycopg_connection(s: Session) -> Any:
    """The psycopg connection under ``s``'s transaction on a ``postgresql+psycopg`` store, else None."""
    bind = s.get_bind()
    if bind.dialect.name != "postgresql" or bind.dialect.driver != "psycopg":
        return None
    return s.connection().connection.driver_connection


def _rows_shape(shape: str) -> tuple[int, int]:
    """A stored feature shape (``"n,d"``, or ``"d"`` for one row) as ``(rows, width)``."""
    dims = tuple(int(x) for x in shape.split(",")) if shape else ()
    if len(dims) == 2:
        return dims  # type: ignore[return-value]
    if len(dims) == 1:
        return 1, dims[0]
    raise ValueError(f"feature shape {shape!r} is neither (n, d) nor (d,)")


class Store:
    """Open (and migrate) the database at ``url``; any SQLAlchemy URL works."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        """``url`` may be a ``$env:NAME``/``$secret:NAME`` reference (alforge/storage/urls.py).
        ``create=False`` (read-only commands) opens an existing alforge store only, raising
        :class:`~alforge.storage.urls.StoreError` otherwise. :attr:`url` is the redacted URL: safe to
        print, never a password."""
        self.engine, self.url = open_engine(url, create=create)
        upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._sessions()

    def close(self) -> None:
        self.engine.dispose()

    def _insert_ignoring_conflict(self, s: Session, entity: Any, values: dict[str, Any]) -> bool:
        """INSERT a row unless it collides with a unique key; True if it was inserted. One statement
        on SQLite and PostgreSQL (``ON CONFLICT DO NOTHING``), so two writers never race. Whether a
        row went in is read from ``RETURNING``: psycopg reports no rowcount for this statement."""
        table = entity.__table__
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            else:
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            stmt = dialect_insert(table).values(**values).on_conflict_do_nothing().returning(*table.primary_key)
            return s.execute(stmt).first() is not None
        try:
            with s.begin_nested():
                s.execute(insert(table).values(**values))
            return True
        except IntegrityError:
            return False

    # ---------------------------------------------------------------- campaigns, iterations
    @unit_of_work
    def get_or_create_campaign(
        self, name: str, config: dict[str, Any], identity: tuple[str, str] | None = None
    ) -> int:
        """The campaign's id, creating it (with ``config`` as version 1 of its config history and
        ``identity`` = the labeller's ``(calculator, params_hash)``) if there is none. An existing
        campaign's config is never replaced here: changes go through :meth:`record_config`."""
        now = _now()
        with self.session() as s, s.begin():
            created = self._insert_ignoring_conflict(
                s, models.Campaign,
                {"name": name, "config_json": json.dumps(config), "status": "running", "created_at": now},
            )
            cid = s.scalar(select(models.Campaign.id).where(models.Campaign.name == name))
            if created:
                calculator, params_hash = identity or (None, None)
                s.add(models.ConfigVersion(
                    campaign_id=cid, version=1, config_json=json.dumps(config),
                    calculator=calculator, params_hash=params_hash, created_at=now,
                ))
            return cid

    @unit_of_work
    def config_versions(self, campaign_id: int) -> list[models.ConfigVersion]:
        """The campaign's config history, oldest first."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(models.ConfigVersion)
                    .where(models.ConfigVersion.campaign_id == campaign_id)
                    .order_by(models.ConfigVersion.version)
                )
            )

    @unit_of_work
    def record_config(
        self,
        campaign_id: int,
        config: dict[str, Any],
        changes: Sequence[dict[str, Any]],
        identity: tuple[str, str] | None,
    ) -> int:
        """Append ``config`` as the campaign's newest config version (with what changed and the
        labeller identity) and make it the current one; returns the version number."""
        calculator, params_hash = identity or (None, None)
        with self.session() as s, s.begin():
            last = s.scalar(
                select(func.max(models.ConfigVersion.version)).where(models.ConfigVersion.campaign_id == campaign_id)
            )
            version = (last or 0) + 1
            s.add(models.ConfigVersion(
                campaign_id=campaign_id, version=version, config_json=json.dumps(config),
                changes_json=json.dumps(list(changes), default=str), calculator=calculator,
                params_hash=params_hash, created_at=_now(),
            ))
            s.execute(
                update(models.Campaign).where(models.Campaign.id == campaign_id).values(config_json=json.dumps(config))
            )
            return version

    # ---------------------------------------------------------------- leases
    @unit_of_work
    def acquire_lease(
        self,
        campaign_id: int,
        owner: str,
        host: str,
        pid: int,
        ttl: float = LEASE_SECONDS,
        holder_gone: Callable[[LeaseInfo], bool] = lambda lease: False,
    ) -> LeaseInfo:
        """Try to make ``owner`` the campaign's owner; returns the lease as it stands afterwards
        (``.owner == owner`` if taken).

        One transaction: an INSERT that does nothing if a lease exists, then, if one does and it has
        expired, is ``owner``'s own, or ``holder_gone`` says its holder is gone (a dead pid on this
        host), an UPDATE conditional on the holder and heartbeat just read, so of two runs taking
        over the same stale lease exactly one succeeds.
        """
        now = _now()
        mine = {"owner": owner, "host": host, "pid": pid, "acquired_at": now, "heartbeat_at": now,
                "expires_at": now + timedelta(seconds=ttl)}
        table = models.CampaignLease
        with self.session() as s, s.begin():
            if not self._insert_ignoring_conflict(s, table, {"campaign_id": campaign_id, **mine}):
                row = s.scalar(select(table).where(table.campaign_id == campaign_id).with_for_update())
                held = _lease_info(row)
                if held.owner == owner or held.expires_at <= now or holder_gone(held):
                    s.execute(
                        update(table)
                        .where(
                            table.campaign_id == campaign_id,
                            table.owner == row.owner,
                            table.heartbeat_at == row.heartbeat_at,
                        )
                        .values(**mine)
                    )
            return _lease_info(s.scalar(select(table).where(table.campaign_id == campaign_id)))

    @unit_of_work
    def renew_lease(self, campaign_id: int, owner: str, ttl: float = LEASE_SECONDS) -> bool:
        """Heartbeat: extend ``owner``'s lease and the claims of its running labels; False if the
        lease is no longer ``owner``'s (it expired and another run took it over)."""
        now = _now()
        expires = now + timedelta(seconds=ttl)
        table = models.CampaignLease
        with self.session() as s, s.begin():
            res = s.execute(
                update(table)
                .where(table.campaign_id == campaign_id, table.owner == owner)
                .values(heartbeat_at=now, expires_at=expires)
            )
            if res.rowcount != 1:
                return False
            s.execute(
                update(models.Label)
                .where(*self._claimed_by(campaign_id, owner))
                .values(claim_expires_at=expires)
            )
            return True

    @unit_of_work
    def release_lease(
        self, campaign_id: int, owner: str, status: str | None = None, message: str | None = None
    ) -> bool:
        """Put ``owner``'s running labels of the campaign back to pending and drop its lease, setting
        the campaign's status if given, all in one transaction. False (and the status untouched) if
        the lease was no longer ``owner``'s."""
        table = models.CampaignLease
        with self.session() as s, s.begin():
            s.execute(
                update(models.Label)
                .where(*self._claimed_by(campaign_id, owner))
                .values(status="pending", claim_owner=None, claim_expires_at=None)
            )
            held = s.execute(delete(table).where(table.campaign_id == campaign_id, table.owner == owner)).rowcount == 1
            if held and status is not None:
                s.execute(
                    update(models.Campaign)
                    .where(models.Campaign.id == campaign_id)
                    .values(status=status, status_message=message)
                )
            return held

    @unit_of_work
    def lease(self, campaign_id: int) -> LeaseInfo | None:
        """The campaign's lease row (possibly expired), or None."""
        with self.session() as s:
            row = s.get(models.CampaignLease, campaign_id)
            return None if row is None else _lease_info(row)

    @staticmethod
    def _claimed_by(campaign_id: int, owner: str) -> tuple[Any, ...]:
        in_campaign = select(models.Structure.id).where(models.Structure.campaign_id == campaign_id)
        return (
            models.Label.claim_owner == owner,
            models.Label.status == "running",
            models.Label.structure_id.in_(in_campaign),
        )

    @unit_of_work
    def campaign_id(self, name: str) -> int:
        with self.session() as s:
            cid = s.scalar(select(models.Campaign.id).where(models.Campaign.name == name))
        if cid is None:
            raise KeyError(f"no campaign named {name!r} in {self.url}")
        return cid

    @unit_of_work
    def campaign_name(self, campaign_id: int) -> str:
        with self.session() as s:
            name = s.scalar(select(models.Campaign.name).where(models.Campaign.id == campaign_id))
        if name is None:
            raise KeyError(f"no campaign with id {campaign_id} in {self.url}")
        return name

    @unit_of_work
    def campaigns(self) -> list[models.Campaign]:
        with self.session() as s:
            return list(s.scalars(select(models.Campaign).order_by(models.Campaign.id)))

    @unit_of_work
    def set_campaign_status(self, campaign_id: int, status: str, message: str | None = None) -> None:
        with self.session() as s, s.begin():
            s.execute(
                update(models.Campaign)
                .where(models.Campaign.id == campaign_id)
                .values(status=status, status_message=message)
            )

    @unit_of_work
    def get_or_create_iteration(self, campaign_id: int, index: int) -> int:
        with self.session() as s, s.begin():
            row = s.scalar(
                select(models.Iteration).where(
                    models.Iteration.campaign_id == campaign_id, models.Iteration.index == index
                )
            )
            if row is None:
                row = models.Iteration(campaign_id=campaign_id, index=index, explored=False)
                s.add(row)
                s.flush()
            return row.id

    @unit_of_work
    def iterations(self, campaign_id: int) -> list[models.Iteration]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(models.Iteration)
                    .where(models.Iteration.campaign_id == campaign_id)
                    .order_by(models.Iteration.index)
                )
            )

    @unit_of_work
    def iteration(self, iteration_id: int) -> models.Iteration:
        with self.session() as s:
            return s.get_one(models.Iteration, iteration_id)

    @unit_of_work
    def finish_iteration(
        self, iteration_id: int, summary: dict[str, Any], stop_reason: str | None = None
    ) -> None:
        with self.session() as s, s.begin():
            s.execute(
                update(models.Iteration)
                .where(models.Iteration.id == iteration_id)
                .values(summary_json=json.dumps(summary), stop_reason=stop_reason, finished_at=_now())
            )

    # ---------------------------------------------------------------- structures
    @unit_of_work
    def add_structures(
        self,
        campaign_id: int,
        atoms_list: Sequence[Atoms],
        role: str,
        source: str,
        iteration_id: int | None = None,
        parent_ids: Sequence[int | None] | None = None,
        provenance: Sequence[dict[str, Any] | None] | None = None,
        completes_exploration: bool = False,
    ) -> list[int]:
        """Insert structures, deduplicated by canonical hash within the campaign.

        Returns one id per input, in order; a duplicate (of a stored structure or of an earlier
        input) maps to the existing id and its provenance is left as first recorded. With
        ``completes_exploration`` the iteration is marked explored in the same transaction, so an
        exploration is either wholly stored or not at all.
        """
        ids: list[int] = []
        with self.session() as s, s.begin():
            known: dict[str, int] = {}
            hashes = [canonical_hash(a) for a in atoms_list]
            for chunk_start in range(0, len(hashes), 500):
                chunk = hashes[chunk_start : chunk_start + 500]
                rows = s.execute(
                    select(models.Structure.hash, models.Structure.id).where(
                        models.Structure.campaign_id == campaign_id, models.Structure.hash.in_(chunk)
                    )
                )
                known.update({h: i for h, i in rows})
            for k, (atoms, h) in enumerate(zip(atoms_list, hashes)):
                if h in known:
                    ids.append(known[h])
                    continue
                cols = atoms_to_columns(atoms)
                row = models.Structure(
                    campaign_id=campaign_id,
                    role=role,
                    source=source,
                    iteration_id=iteration_id,
                    parent_id=parent_ids[k] if parent_ids else None,
                    provenance_json=json.dumps(provenance[k]) if provenance and provenance[k] else None,
                    quarantined=False,
                    **cols,
                )
                s.add(row)
                s.flush()
                known[h] = row.id
                ids.append(row.id)
            if completes_exploration:
                if iteration_id is None:
                    raise ValueError("completes_exploration needs an iteration_id")
                s.execute(
                    update(models.Iteration).where(models.Iteration.id == iteration_id).values(explored=True)
                )
        return ids

    @unit_of_work
    def get_atoms(self, ids: Sequence[int]) -> list[Atoms]:
        """Structures in the order of ``ids``, with ``info['alforge_id']`` set."""
        by_id: dict[int, Atoms] = {}
        with self.session() as s:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                for row in s.execute(select(*_STRUCTURE_COLUMNS).where(models.Structure.id.in_(chunk))):
                    by_id[row.id] = columns_to_atoms(*row[1:])
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"structure ids not in the store: {missing[:10]}")
        out = []
        for i in ids:
            atoms = by_id[i].copy()
            atoms.info["alforge_id"] = int(i)
            out.append(atoms)
        return out

    @unit_of_work
    def structure_ids(
        self,
        campaign_id: int,
        role: str | None = None,
        iteration_id: int | None = None,
        include_quarantined: bool = True,
    ) -> list[int]:
        q = select(models.Structure.id).where(models.Structure.campaign_id == campaign_id)
        if role is not None:
            q = q.where(models.Structure.role == role)
        if iteration_id is not None:
            q = q.where(models.Structure.iteration_id == iteration_id)
        if not include_quarantined:
            q = q.where(models.Structure.quarantined.is_(False))
        with self.session() as s:
            return list(s.scalars(q.order_by(models.Structure.id)))

    @unit_of_work
    def count_structures(self, campaign_id: int, role: str | None = None, source: str | None = None) -> int:
        q = select(func.count()).select_from(models.Structure).where(models.Structure.campaign_id == campaign_id)
        if role is not None:
            q = q.where(models.Structure.role == role)
        if source is not None:
            q = q.where(models.Structure.source == source)
        with self.session() as s:
            return int(s.scalar(q))

    @unit_of_work
    def structure_records(self, campaign_id: int, role: str | None = None) -> list[dict[str, Any]]:
        """Provenance of the campaign's structures (of ``role``), by id: role, source, the index of
        the iteration that made it (None for seeds, tests, targets and pool), parent structure,
        provenance details and the quarantine flag; for the Python API's ``structures()``."""
        q = (
            select(
                models.Structure.id, models.Structure.role, models.Structure.source, models.Iteration.index,
                models.Structure.parent_id, models.Structure.provenance_json, models.Structure.quarantined,
            )
            .outerjoin(models.Iteration, models.Iteration.id == models.Structure.iteration_id)
            .where(models.Structure.campaign_id == campaign_id)
        )
        if role is not None:
            q = q.where(models.Structure.role == role)
        with self.session() as s:
            rows = s.execute(q.order_by(models.Structure.id)).all()
        return [
            {"id": sid, "role": r, "source": src, "iteration": index, "parent_id": parent,
             "provenance": json.loads(prov) if prov else {}, "quarantined": bool(quarantined)}
            for sid, r, src, index, parent, prov, quarantined in rows
        ]

    @unit_of_work
    def candidate_pool_ids(self, campaign_id: int, iteration_id: int) -> list[int]:
        """The candidates selection may pick from in an iteration: its own MD frames plus every
        structure of the fixed pool (source ``pool``, no iteration), all without a finished label and
        not quarantined; sorted by id. (Failed, non-quarantined candidates of earlier MD iterations
        are added by the caller: :meth:`failed_ids`.)"""
        done = select(models.Label.structure_id).where(models.Label.status == "done")
        q = select(models.Structure.id).where(
            models.Structure.campaign_id == campaign_id,
            models.Structure.role == "candidate",
            models.Structure.quarantined.is_(False),
            (models.Structure.iteration_id == iteration_id)
            | ((models.Structure.source == "pool") & models.Structure.iteration_id.is_(None)),
            models.Structure.id.not_in(done),
        )
        with self.session() as s:
            return list(s.scalars(q.order_by(models.Structure.id)))

    # ---------------------------------------------------------------- labels
    @unit_of_work
    def request_labels(
        self,
        structure_ids: Sequence[int],
        calculator: str,
        params_hash: str,
        retry_failed_before: datetime | None = None,
    ) -> None:
        """Create pending label rows for structures that have none for this calculator set-up.

        With ``retry_failed_before`` (the time of the selection that picked them), a label of a
        structure that is not quarantined and that failed *before* that time goes back to pending:
        one new labelling round per new pick (its earlier attempts still count towards quarantine).
        A label that failed after it, in that round, stays failed on every rerun.
        """
        ids = list(dict.fromkeys(structure_ids))
        with self.session() as s, s.begin():
            have = set(
                s.scalars(
                    select(models.Label.structure_id).where(
                        models.Label.structure_id.in_(ids),
                        models.Label.calculator == calculator,
                        models.Label.params_hash == params_hash,
                    )
                )
            )
            todo = [i for i in ids if i not in have]
            if todo:
                s.execute(
                    insert(models.Label),
                    [
                        {
                            "structure_id": i,
                            "calculator": calculator,
                            "params_hash": params_hash,
                            "status": "pending",
                            "attempts": 0,
                            "created_at": _now(),
                        }
                        for i in todo
                    ],
                )
            if retry_failed_before is not None:
                eligible = select(models.Structure.id).where(
                    models.Structure.id.in_(ids), models.Structure.quarantined.is_(False)
                )
                s.execute(
                    update(models.Label)
                    .where(
                        models.Label.structure_id.in_(eligible),
                        models.Label.calculator == calculator,
                        models.Label.params_hash == params_hash,
                        models.Label.status == "failed",
                        models.Label.finished_at < retry_failed_before,
                    )
                    .values(status="pending")
                )

    @unit_of_work
    def unfinished_labels(self, campaign_id: int, calculator: str | None = None) -> list[tuple[int, int]]:
        """``(label_id, structure_id)`` of labels not yet done or failed.

        ``running`` labels are returned too: one left by a killed run never finished and is
        computed by the next; :meth:`start_label` decides, by its claim, whether it may be.
        """
        q = (
            select(models.Label.id, models.Label.structure_id)
            .join(models.Structure, models.Structure.id == models.Label.structure_id)
            .where(models.Structure.campaign_id == campaign_id, models.Label.status.in_(("pending", "running")))
        )
        if calculator is not None:
            q = q.where(models.Label.calculator == calculator)
        with self.session() as s:
            return [(r[0], r[1]) for r in s.execute(q.order_by(models.Label.id))]

    @unit_of_work
    def start_label(self, label_id: int, owner: str | None = None, ttl: float = LEASE_SECONDS) -> bool:
        """Claim a label for ``owner`` and mark it running; False if it finished (never recomputed)
        or another owner's claim on it is alive.

        A ``running`` label is taken over only when its claim expired or its owner holds no live
        campaign lease (a killed run): one conditional UPDATE, so of two runs exactly one wins.
        ``owner=None`` (imports, which finish at once) makes a claim nobody renews.
        """
        now = _now()
        label = models.Label
        owner_alive = (
            select(models.CampaignLease.owner)
            .where(models.CampaignLease.owner == label.claim_owner, models.CampaignLease.expires_at > now)
            .exists()
        )
        abandoned = (label.status == "running") & (
            label.claim_expires_at.is_(None) | (label.claim_expires_at <= now) | ~owner_alive
        )
        with self.session() as s, s.begin():
            res = s.execute(
                update(label)
                .where(label.id == label_id, (label.status == "pending") | abandoned)
                .values(
                    status="running", attempts=label.attempts + 1, claim_owner=owner,
                    claim_expires_at=now + timedelta(seconds=ttl),
                )
            )
            return res.rowcount == 1

    @unit_of_work
    def finish_label(
        self,
        label_id: int,
        record: LabelRecord,
        attempts: Sequence[dict[str, Any]] = (),
        quarantine: bool = False,
        owner: str | None = None,
    ) -> bool:
        """Store the outcome, every attempt behind it and (if decided) the structure's quarantine,
        all in one transaction: a crash leaves the label either finished or still to do.

        Only the holder of the label's claim (``owner``, as given to :meth:`start_label`) may finish
        it; False, and nothing stored, if the claim was lost (the run released it or was taken over).
        """
        values: dict[str, Any] = {
            "status": record.status,
            "energy": record.energy,
            "forces": arrays.pack(record.forces),
            "stress": arrays.pack(record.stress),
            "failure_class": record.failure_class,
            "error": record.error,
            "output_tail": record.output_tail,
            "wall_time": record.wall_time,
            "host": record.host,
            "code_version": record.code_version,
            "metadata_json": json.dumps(record.metadata, default=str) if record.metadata else None,
            "finished_at": _now(),
            "claim_owner": None,
            "claim_expires_at": None,
        }
        with self.session() as s, s.begin():
            res = s.execute(
                update(models.Label)
                .where(
                    models.Label.id == label_id,
                    models.Label.status == "running",
                    models.Label.claim_owner.is_not_distinct_from(owner),
                )
                .values(**values)
            )
            if res.rowcount != 1:
                return False
            self._add_attempts(s, label_id, attempts)
            if quarantine:
                sid = select(models.Label.structure_id).where(models.Label.id == label_id).scalar_subquery()
                s.execute(update(models.Structure).where(models.Structure.id == sid).values(quarantined=True))
            return True

    @unit_of_work
    def reset_failed_labels(
        self, campaign_id: int, classes: Sequence[str] | None = None, roles: Sequence[str] | None = None
    ) -> int:
        """``alforge retry``: failed labels of structures that are not quarantined go back to pending
        (optionally only these failure classes / structure roles); returns how many. Their earlier
        attempts are kept and still count towards quarantine."""
        eligible = select(models.Structure.id).where(
            models.Structure.campaign_id == campaign_id, models.Structure.quarantined.is_(False)
        )
        if roles:
            eligible = eligible.where(models.Structure.role.in_(list(roles)))
        q = update(models.Label).where(models.Label.status == "failed", models.Label.structure_id.in_(eligible))
        if classes:
            q = q.where(models.Label.failure_class.in_(list(classes)))
        with self.session() as s, s.begin():
            return s.execute(
                q.values(status="pending", failure_class=None, error=None, output_tail=None, finished_at=None)
            ).rowcount

    @staticmethod
    def _add_attempts(s: Session, label_id: int, attempts: Sequence[dict[str, Any]]) -> None:
        if not attempts:
            return
        offset = s.scalar(
            select(func.count()).select_from(models.LabelAttempt).where(models.LabelAttempt.label_id == label_id)
        )
        s.execute(
            insert(models.LabelAttempt),
            [
                {
                    "label_id": label_id,
                    "attempt": offset + k + 1,
                    "failure_class": a.get("failure_class"),
                    "message": a.get("message") or None,
                    "output_tail": a.get("output_tail") or None,
                    "wall_time": a.get("wall_time"),
                    "kwargs_json": json.dumps(a.get("kwargs") or {}, default=str),
                    "metadata_json": json.dumps(a.get("metadata") or {}, default=str),
                    "decision": a.get("decision"),
                    "decision_reason": a.get("decision_reason") or None,
                    "created_at": _now(),
                }
                for k, a in enumerate(attempts)
            ],
        )

    @unit_of_work
    def attempts(self, label_id: int) -> list[models.LabelAttempt]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(models.LabelAttempt)
                    .where(models.LabelAttempt.label_id == label_id)
                    .order_by(models.LabelAttempt.attempt)
                )
            )

    def failed_attempt_classes(self, label_id: int) -> list[str]:
        """Failure classes of a label's earlier failed attempts, oldest first (they count towards quarantine)."""
        return [a.failure_class for a in self.attempts(label_id) if a.failure_class is not None]

    @unit_of_work
    def failed_ids(self, campaign_id: int, role: str | None = None, include_quarantined: bool = False) -> list[int]:
        """Structures whose label failed (and, by default, that are not quarantined)."""
        q = (
            select(models.Structure.id)
            .join(models.Label, models.Label.structure_id == models.Structure.id)
            .where(models.Structure.campaign_id == campaign_id, models.Label.status == "failed")
        )
        if role is not None:
            q = q.where(models.Structure.role == role)
        if not include_quarantined:
            q = q.where(models.Structure.quarantined.is_(False))
        with self.session() as s:
            return sorted(set(s.scalars(q)))

    @unit_of_work
    def quarantined_ids(self, campaign_id: int) -> list[int]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(models.Structure.id)
                    .where(models.Structure.campaign_id == campaign_id, models.Structure.quarantined.is_(True))
                    .order_by(models.Structure.id)
                )
            )

    @unit_of_work
    def labelled_ids(self, campaign_id: int, role: str | None = None) -> list[int]:
        """Structure ids with a finished label (any calculator), sorted."""
        q = (
            select(models.Structure.id)
            .join(models.Label, models.Label.structure_id == models.Structure.id)
            .where(models.Structure.campaign_id == campaign_id, models.Label.status == "done")
        )
        if role is not None:
            q = q.where(models.Structure.role == role)
        with self.session() as s:
            return sorted(set(s.scalars(q)))

    @unit_of_work
    def get_labelled_atoms(self, ids: Sequence[int]) -> list[Atoms]:
        """Structures with their finished labels attached as a ``SinglePointCalculator``."""
        atoms_list = self.get_atoms(ids)
        with self.session() as s:
            rows = {
                r.structure_id: r
                for r in s.execute(
                    select(
                        models.Label.structure_id,
                        models.Label.energy,
                        models.Label.forces,
                        models.Label.stress,
                        models.Label.calculator,
                    ).where(models.Label.structure_id.in_(list(ids)), models.Label.status == "done")
                )
            }
        for atoms in atoms_list:
            sid = atoms.info["alforge_id"]
            if sid not in rows:
                raise KeyError(f"structure {sid} has no finished label")
            r = rows[sid]
            results: dict[str, Any] = {
                "energy": r.energy,
                "forces": arrays.unpack(r.forces, (len(atoms), 3)),
            }
            if r.stress is not None:
                results["stress"] = arrays.unpack(r.stress, (3, 3))
            atoms.calc = SinglePointCalculator(atoms, **results)
            atoms.info["label_calculator"] = r.calculator
        return atoms_list

    @unit_of_work
    def failure_counts(self, campaign_id: int) -> dict[str, int]:
        """Failed labels by failure class."""
        with self.session() as s:
            rows = s.execute(
                select(models.Label.failure_class, func.count())
                .join(models.Structure, models.Structure.id == models.Label.structure_id)
                .where(models.Structure.campaign_id == campaign_id, models.Label.status == "failed")
                .group_by(models.Label.failure_class)
            )
            return {cls or "unknown": n for cls, n in rows}

    @unit_of_work
    def label_counts(self, campaign_id: int) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(
                select(models.Label.status, func.count())
                .join(models.Structure, models.Structure.id == models.Label.structure_id)
                .where(models.Structure.campaign_id == campaign_id)
                .group_by(models.Label.status)
            )
            return {status: n for status, n in rows}

    @unit_of_work
    def labels(self, structure_ids: Sequence[int]) -> list[models.Label]:
        with self.session() as s:
            return list(
                s.scalars(select(models.Label).where(models.Label.structure_id.in_(list(structure_ids))))
            )

    # ---------------------------------------------------------------- models
    @unit_of_work
    def add_model(
        self,
        campaign_id: int,
        iteration_id: int,
        path: str,
        train_ids: Sequence[int],
        metrics: dict[str, Any],
        parent_model_id: int | None = None,
        sha256: str | None = None,
    ) -> int:
        """The id of the iteration's model: this one (``path``, a file never to be replaced, with its
        ``sha256``) unless another run stored one first, whose id is returned instead (the caller
        then owns ``path`` alone and removes it). One model per iteration, and no IntegrityError."""
        values = {
            "campaign_id": campaign_id, "iteration_id": iteration_id, "path": path, "sha256": sha256,
            "parent_model_id": parent_model_id, "train_ids": np.asarray(train_ids, dtype="<i8").tobytes(),
            "metrics_json": json.dumps(metrics), "created_at": _now(),
        }
        with self.session() as s, s.begin():
            self._insert_ignoring_conflict(s, models.Model, values)
            return s.scalar(
                select(models.Model.id).where(
                    models.Model.campaign_id == campaign_id, models.Model.iteration_id == iteration_id
                )
            )

    @unit_of_work
    def update_model_metrics(self, model_id: int, metrics: dict[str, Any]) -> None:
        with self.session() as s, s.begin():
            row = s.get_one(models.Model, model_id)
            merged = json.loads(row.metrics_json or "{}")
            merged.update(metrics)
            row.metrics_json = json.dumps(merged)

    def _model_info(self, row: models.Model, index: int) -> ModelInfo:
        return ModelInfo(
            row.id, index, row.path, _ids(row.train_ids), json.loads(row.metrics_json or "{}"), row.parent_model_id,
            row.sha256,
        )

    def model_file(self, model_id: int) -> Path:
        """The model's file, after checking that its SHA-256 is the one stored with the row
        (:class:`ModelFileError` otherwise): model files are trusted only through the store."""
        info = self.model(model_id)
        return verified_model_file(info.path, info.sha256, f"model {model_id} (iteration {info.iteration_index})")

    @unit_of_work
    def committee_files(self, model_id: int, skip_missing: bool = False) -> dict[int, Path]:
        """``{member: file}`` of the model's extra committee members, each checked as in
        :meth:`model_file`; with ``skip_missing`` members whose file is gone are left out (a start
        point for training is optional, a committee to select with is not)."""
        with self.session() as s:
            rows = s.execute(
                select(models.CommitteeMember.member, models.CommitteeMember.path, models.CommitteeMember.sha256)
                .where(models.CommitteeMember.model_id == model_id)
                .order_by(models.CommitteeMember.member)
            )
            return {
                m: verified_model_file(path, digest, f"committee member {m} of model {model_id}")
                for m, path, digest in rows
                if not skip_missing or Path(path).exists()
            }

    @unit_of_work
    def model_for_iteration(self, iteration_id: int) -> ModelInfo | None:
        with self.session() as s:
            row = s.execute(
                select(models.Model, models.Iteration.index)
                .join(models.Iteration, models.Iteration.id == models.Model.iteration_id)
                .where(models.Model.iteration_id == iteration_id)
            ).first()
            return None if row is None else self._model_info(row[0], row[1])

    @unit_of_work
    def models(self, campaign_id: int) -> list[ModelInfo]:
        with self.session() as s:
            rows = s.execute(
                select(models.Model, models.Iteration.index)
                .join(models.Iteration, models.Iteration.id == models.Model.iteration_id)
                .where(models.Model.campaign_id == campaign_id)
                .order_by(models.Iteration.index)
            )
            return [self._model_info(m, i) for m, i in rows]

    @unit_of_work
    def model(self, model_id: int) -> ModelInfo:
        with self.session() as s:
            m, index = s.execute(
                select(models.Model, models.Iteration.index)
                .join(models.Iteration, models.Iteration.id == models.Model.iteration_id)
                .where(models.Model.id == model_id)
            ).one()
            return self._model_info(m, index)

    @unit_of_work
    def add_committee_member(
        self, model_id: int, member: int, seed: int, path: str, metrics: dict[str, Any], sha256: str | None = None
    ) -> str:
        """Store a committee member (``path`` never replaced, with its ``sha256``); returns the path
        the store holds for it, another run's if that stored the member first."""
        values = {
            "model_id": model_id, "member": member, "seed": seed, "path": path, "sha256": sha256,
            "metrics_json": json.dumps(metrics), "created_at": _now(),
        }
        with self.session() as s, s.begin():
            self._insert_ignoring_conflict(s, models.CommitteeMember, values)
            return s.scalar(
                select(models.CommitteeMember.path).where(
                    models.CommitteeMember.model_id == model_id, models.CommitteeMember.member == member
                )
            )

    @unit_of_work
    def committee_paths(self, model_id: int) -> dict[int, str]:
        """``{member: path}`` of the extra committee models trained beside ``model_id``."""
        with self.session() as s:
            rows = s.execute(
                select(models.CommitteeMember.member, models.CommitteeMember.path)
                .where(models.CommitteeMember.model_id == model_id)
                .order_by(models.CommitteeMember.member)
            )
            return {m: p for m, p in rows}

    #: columns of a ``training_epochs`` row as :meth:`training_epochs` returns them
    EPOCH_FIELDS = (
        "epoch", "epochs", "train_loss", "valid_loss", "valid_energy_rmse_per_atom", "valid_forces_rmse", "seconds",
    )

    @unit_of_work
    def add_training_epochs(self, model_id: int, epochs: Sequence[dict[str, Any]]) -> None:
        """Store a model's training history (dicts with :attr:`EPOCH_FIELDS`; ``valid_*`` may be
        missing). An epoch already stored for the model is kept: a rerun never duplicates one."""
        with self.session() as s, s.begin():
            for row in epochs:
                values = {k: row.get(k) for k in self.EPOCH_FIELDS} | {"model_id": model_id}
                self._insert_ignoring_conflict(s, models.TrainingEpoch, values)

    @unit_of_work
    def training_epochs(self, model_id: int) -> list[dict[str, Any]]:
        """The model's training epochs in order, as dicts of :attr:`EPOCH_FIELDS`."""
        with self.session() as s:
            rows = s.scalars(
                select(models.TrainingEpoch)
                .where(models.TrainingEpoch.model_id == model_id)
                .order_by(models.TrainingEpoch.epoch)
            )
            return [{k: getattr(r, k) for k in self.EPOCH_FIELDS} for r in rows]

    @unit_of_work
    def put_training_errors(self, model_id: int, errors: TrainingErrors) -> None:
        """Store a model's training errors (float16 unless given otherwise), replacing earlier ones.
        Shapes must agree: one force row per atom of ``atom_counts``, one energy row per structure."""
        n_structures, n_atoms = len(errors.structure_ids), int(np.sum(errors.atom_counts))
        expected = {  # name: (array, rows, dimensions)
            "atom_counts": (errors.atom_counts, n_structures, 1),
            "forces": (errors.forces, n_atoms, 2),
            "energy": (errors.energy, n_structures, 2),
            "forces_last": (errors.forces_last, n_atoms, 1),
            "energy_last": (errors.energy_last, n_structures, 1),
        }
        for name, (array, rows, ndim) in expected.items():
            shape = np.shape(array)
            if len(shape) != ndim or shape[0] != rows:
                raise ValueError(f"training errors of model {model_id}: {name} has shape {shape}, expected "
                                 f"{ndim} dimension(s) with {rows} rows (structures: {n_structures}, atoms: {n_atoms})")
        if errors.form not in ("epochs", "quantiles"):
            raise ValueError(f"training errors of model {model_id}: form {errors.form!r}, expected 'epochs' or 'quantiles'")
        dtype = errors.forces.dtype.newbyteorder("<").str
        forces, _, forces_shape = arrays.encode(errors.forces, dtype)
        energy, _, energy_shape = arrays.encode(errors.energy, dtype)
        with self.session() as s, s.begin():
            s.execute(delete(models.TrainingErrors).where(models.TrainingErrors.model_id == model_id))
            s.add(
                models.TrainingErrors(
                    model_id=model_id, form=errors.form, n_epochs=int(errors.n_epochs), dtype=dtype,
                    structure_ids=arrays.pack(errors.structure_ids, "<i8"),
                    atom_counts=arrays.pack(errors.atom_counts, "<i8"),
                    forces_shape=forces_shape, forces=forces, energy_shape=energy_shape, energy=energy,
                    forces_last=arrays.pack(errors.forces_last, dtype),
                    energy_last=arrays.pack(errors.energy_last, dtype),
                    created_at=_now(),
                )
            )

    @unit_of_work
    def training_errors(self, model_id: int) -> TrainingErrors | None:
        """The model's stored training errors, or ``None`` (trained before they were logged)."""
        with self.session() as s:
            row = s.scalars(select(models.TrainingErrors).where(models.TrainingErrors.model_id == model_id)).first()
            if row is None:
                return None
            ids = _ids(row.structure_ids)
            counts = np.frombuffer(row.atom_counts, dtype="<i8").copy()
            return TrainingErrors(
                structure_ids=ids,
                atom_counts=counts,
                forces=arrays.decode(row.forces, row.dtype, row.forces_shape),
                energy=arrays.decode(row.energy, row.dtype, row.energy_shape),
                forces_last=arrays.unpack(row.forces_last, (int(counts.sum()),), row.dtype),
                energy_last=arrays.unpack(row.energy_last, (len(ids),), row.dtype),
                n_epochs=row.n_epochs,
                form=row.form,
            )

    def learning_curve(self, campaign_id: int) -> list[dict[str, Any]]:
        """One row per iteration with a model: the labels it was trained on and its test errors.

        ``n_labels`` counts the model's training structures (seeds + candidates labelled so far),
        ``n_selected`` the candidates picked in that iteration (labelled before the next model);
        ``test_*`` are the stored test metrics (None when there is no test set, or, for the force
        metrics, when no test structure has forces); ``training_epochs`` is the model's training
        history (:meth:`training_epochs`), so ``alforge status --json`` shows how each model trained.
        """
        models_by_iteration = {m.iteration_index: m for m in self.models(campaign_id)}
        out = []
        for it in self.iterations(campaign_id):
            m = models_by_iteration.get(it.index)
            if m is None:
                continue
            mt = m.metrics
            sel = self.selection_for_iteration(it.id)
            out.append({
                "iteration": it.index,
                "model_id": m.id,
                "n_labels": int(len(m.train_ids)),
                "n_selected": int(len(sel["picked_ids"])) if sel else 0,
                "n_test": mt.get("n_test"),
                "test_energy_rmse_per_atom": mt.get("test_energy_rmse_per_atom"),
                "test_energy_mae_per_atom": mt.get("test_energy_mae_per_atom"),
                "test_forces_rmse": mt.get("test_forces_rmse"),
                "test_forces_mae": mt.get("test_forces_mae"),
                "train_forces_rmse": mt.get("train_forces_rmse"),
                "finished": it.finished_at is not None,
                "training_epochs": self.training_epochs(m.id),
            })
        return out

    # ---------------------------------------------------------------- features
    @unit_of_work
    def put_features(
        self, model_id: int, kinds: dict[str, tuple[dict[int, np.ndarray], str]]
    ) -> None:
        """Store feature arrays of several kinds, ``{kind: ({structure_id: array}, dtype)}``, in one
        transaction (so a structure never has some kinds and not others), replacing rows of the same
        (structure, model, kind). One blob per (structure, kind), written by a bulk Core
        executemany: the ORM is ~6× slower, one row per atom ~5× slower again (docs/STACK.md)."""
        rows = []
        for kind, (features, dtype) in kinds.items():
            for sid, arr in features.items():
                data, dt, shape = arrays.encode(arr, dtype)
                rows.append(
                    {"structure_id": sid, "model_id": model_id, "kind": kind, "dtype": dt, "shape": shape, "data": data}
                )
        if not rows:
            return
        with self.session() as s, s.begin():
            for kind, (features, _) in kinds.items():
                ids = list(features)
                for start in range(0, len(ids), FEATURE_CHUNK):  # below SQLite's bound-parameter limit
                    s.execute(
                        delete(models.Feature).where(
                            models.Feature.model_id == model_id,
                            models.Feature.kind == kind,
                            models.Feature.structure_id.in_(ids[start : start + FEATURE_CHUNK]),
                        )
                    )
            s.execute(insert(models.Feature), rows)

    @unit_of_work
    def missing_features(self, model_id: int, kind: str, structure_ids: Sequence[int]) -> list[int]:
        with self.session() as s:
            have = set(
                s.scalars(
                    select(models.Feature.structure_id).where(
                        models.Feature.model_id == model_id, models.Feature.kind == kind
                    )
                )
            )
        return [i for i in structure_ids if i not in have]

    @staticmethod
    def _feature_blobs(
        s: Session, model_id: int, kind: str, structure_ids: Sequence[int]
    ) -> Iterable[tuple[int, bytes, str, str]]:
        """``(structure_id, data, dtype, shape)`` of the stored arrays, ``FEATURE_CHUNK`` structures
        per query (in no particular order; a structure without one is simply not yielded).

        On PostgreSQL through psycopg the blobs come in the binary result format: in the text
        format, psycopg's default, every bytea arrives hex-encoded (twice the bytes) and is decoded
        on the client: 3.6x slower for the same blobs here, and 2.5x slower reads of 1e6 feature rows
        through the store (``benchmarks/bench_select_path.py --backend postgresql``). Same query, same
        transaction.
        """
        raw = _psycopg_connection(s)
        for start in range(0, len(structure_ids), FEATURE_CHUNK):
            chunk = [int(i) for i in structure_ids[start : start + FEATURE_CHUNK]]
            if raw is not None:
                with raw.cursor(binary=True) as cur:
                    cur.execute(_PG_FEATURE_BLOBS, (model_id, kind, chunk))
                    yield from cur
                continue
            yield from s.execute(
                select(
                    models.Feature.structure_id, models.Feature.data, models.Feature.dtype, models.Feature.shape
                ).where(
                    models.Feature.model_id == model_id,
                    models.Feature.kind == kind,
                    models.Feature.structure_id.in_(chunk),
                )
            )

    @staticmethod
    def _no_features(model_id: int, kind: str, structure_ids: Sequence[int], found: Any) -> None:
        missing = [i for i in structure_ids if i not in found]
        if missing:
            raise KeyError(f"no {kind!r} features of model {model_id} for structures {missing[:10]}")

    @unit_of_work
    def get_features(self, model_id: int, kind: str, structure_ids: Sequence[int]) -> list[np.ndarray]:
        """One array per structure, in the order of ``structure_ids``."""
        found: dict[int, np.ndarray] = {}
        with self.session() as s:
            for sid, data, dt, shape in self._feature_blobs(s, model_id, kind, list(dict.fromkeys(structure_ids))):
                found[sid] = arrays.decode(data, dt, shape)
        self._no_features(model_id, kind, structure_ids, found)
        return [found[i] for i in structure_ids]

    @unit_of_work
    def get_feature_rows(
        self, model_id: int, kind: str, structure_ids: Sequence[int], dtype: str | np.dtype = "<f4"
    ) -> arrays.StackedRows:
        """Every structure's rows of ``kind`` stacked in the order of ``structure_ids`` (a 1-D array
        is one row), as ``dtype``.

        Reads the stored shapes first (no blob is touched), allocates the one output array, then
        streams the blobs ``FEATURE_CHUNK`` structures per query and copies each straight into its
        place with ``np.frombuffer``: peak memory is the output plus one query's blobs, not a list
        of per-structure arrays plus their concatenation.
        """
        ids = [int(i) for i in structure_ids]
        unique = list(dict.fromkeys(ids))
        with self.session() as s:
            shapes: dict[int, tuple[int, int]] = {}
            for start in range(0, len(unique), FEATURE_CHUNK):
                for sid, shape in s.execute(
                    select(models.Feature.structure_id, models.Feature.shape).where(
                        models.Feature.model_id == model_id,
                        models.Feature.kind == kind,
                        models.Feature.structure_id.in_(unique[start : start + FEATURE_CHUNK]),
                    )
                ):
                    shapes[sid] = _rows_shape(shape)
            self._no_features(model_id, kind, ids, shapes)
            widths = sorted({w for _, w in shapes.values()})
            if len(widths) > 1:
                raise ValueError(f"{kind!r} features of model {model_id} have different widths {widths[:5]}")
            width = widths[0] if widths else 0
            offsets = np.zeros(len(ids) + 1, dtype=np.int64)
            np.cumsum([shapes[i][0] for i in ids], out=offsets[1:])
            out = np.empty((int(offsets[-1]), width), dtype=dtype)
            where: dict[int, list[int]] = {}
            for k, sid in enumerate(ids):
                where.setdefault(sid, []).append(k)
            for sid, data, dt, shape in self._feature_blobs(s, model_id, kind, unique):
                if _rows_shape(shape) != shapes[sid]:  # replaced by another writer between the two reads
                    raise RuntimeError(f"{kind!r} features of structure {sid} changed while being read")
                block = np.frombuffer(data, dtype=np.dtype(dt)).reshape(shapes[sid])
                for k in where[sid]:
                    out[offsets[k] : offsets[k + 1]] = block
        return arrays.StackedRows(out, offsets)

    @unit_of_work
    def get_feature_sums(
        self,
        model_id: int,
        kind: str,
        structure_ids: Sequence[int],
        dtype: str | np.dtype = "<f8",
        mean: bool = False,
    ) -> np.ndarray:
        """``(n, d)``: row ``k`` is the sum (with ``mean``, the mean) over the rows of structure
        ``structure_ids[k]``'s ``kind`` array, accumulated in float64 and stored as ``dtype``.

        Streamed like :meth:`get_feature_rows`: the per-atom rows are never all in memory, only the
        structure rows are (``f_s = Σ_j f_j`` and ``f_s / n_s``, METHODS §1–2).
        """
        ids = [int(i) for i in structure_ids]
        where: dict[int, list[int]] = {}
        for k, sid in enumerate(ids):
            where.setdefault(sid, []).append(k)
        out: np.ndarray | None = None
        seen: set[int] = set()
        with self.session() as s:
            for sid, data, dt, shape in self._feature_blobs(s, model_id, kind, list(where)):
                block = np.frombuffer(data, dtype=np.dtype(dt)).reshape(_rows_shape(shape))
                row = block.mean(axis=0, dtype=np.float64) if mean else block.sum(axis=0, dtype=np.float64)
                if out is None:
                    out = np.empty((len(ids), len(row)), dtype=dtype)
                elif len(row) != out.shape[1]:
                    raise ValueError(f"{kind!r} features of model {model_id} have widths {out.shape[1]} and {len(row)}")
                out[where[sid]] = row
                seen.add(sid)
        self._no_features(model_id, kind, ids, seen)
        return out if out is not None else np.empty((0, 0), dtype=dtype)

    @unit_of_work
    def feature_count(self, campaign_id: int) -> int:
        with self.session() as s:
            return s.scalar(
                select(func.count())
                .select_from(models.Feature)
                .join(models.Model, models.Model.id == models.Feature.model_id)
                .where(models.Model.campaign_id == campaign_id)
            )

    # ---------------------------------------------------------------- model Hessians
    @unit_of_work
    def put_hessian(
        self,
        model_id: int,
        form: str,
        matrix: np.ndarray,
        regularizer: float,
        method: str,
        weights: dict[str, float],
        n_structures: int,
    ) -> None:
        """Store the model's Hessian of ``form`` (float64 bytes), replacing an earlier one."""
        data, dt, shape = arrays.encode(matrix, "<f8")
        with self.session() as s, s.begin():
            s.execute(
                delete(models.ModelHessian).where(
                    models.ModelHessian.model_id == model_id, models.ModelHessian.form == form
                )
            )
            s.add(
                models.ModelHessian(
                    model_id=model_id,
                    form=form,
                    dtype=dt,
                    shape=shape,
                    matrix=data,
                    regularizer=float(regularizer),
                    regularizer_method=method,
                    weights_json=json.dumps(weights),
                    n_structures=int(n_structures),
                    created_at=_now(),
                )
            )

    @unit_of_work
    def get_hessian(self, model_id: int, form: str) -> dict[str, Any] | None:
        """``{matrix, regularizer, regularizer_method, weights, n_structures, created_at}`` or ``None``."""
        with self.session() as s:
            row = s.scalars(
                select(models.ModelHessian).where(
                    models.ModelHessian.model_id == model_id, models.ModelHessian.form == form
                )
            ).first()
            if row is None:
                return None
            return {
                "matrix": arrays.decode(row.matrix, row.dtype, row.shape),
                "regularizer": row.regularizer,
                "regularizer_method": row.regularizer_method,
                "weights": json.loads(row.weights_json),
                "n_structures": row.n_structures,
                "created_at": row.created_at,
            }

    # ---------------------------------------------------------------- auxiliary models (PROBE)
    @unit_of_work
    def add_aux_model(
        self,
        model_id: int,
        kind: str,
        path: str,
        sha256: str,
        backbone_sha256: str,
        params: dict[str, Any],
        metrics: dict[str, Any] | None = None,
    ) -> str:
        """Store the model's auxiliary model of ``kind`` (``path`` never replaced, with its
        ``sha256`` and the backbone file's ``backbone_sha256``); returns the path the store holds
        for it, another run's if that stored one first (the caller then removes its own file)."""
        values = {
            "model_id": model_id, "kind": kind, "path": path, "sha256": sha256, "backbone_sha256": backbone_sha256,
            "params_json": json.dumps(params, default=str), "metrics_json": json.dumps(metrics) if metrics else None,
            "created_at": _now(),
        }
        with self.session() as s, s.begin():
            self._insert_ignoring_conflict(s, models.AuxModel, values)
            return s.scalar(
                select(models.AuxModel.path).where(models.AuxModel.model_id == model_id, models.AuxModel.kind == kind)
            )

    @unit_of_work
    def aux_model(self, model_id: int, kind: str) -> dict[str, Any] | None:
        """``{path, sha256, backbone_sha256, params, metrics, created_at}`` of (model, kind), or ``None``."""
        with self.session() as s:
            row = s.scalars(
                select(models.AuxModel).where(models.AuxModel.model_id == model_id, models.AuxModel.kind == kind)
            ).first()
            if row is None:
                return None
            return {
                "path": row.path, "sha256": row.sha256, "backbone_sha256": row.backbone_sha256,
                "params": json.loads(row.params_json), "metrics": json.loads(row.metrics_json or "{}"),
                "created_at": row.created_at,
            }

    def aux_model_file(self, model_id: int, kind: str) -> Path | None:
        """The (model, kind) auxiliary model's file once its SHA-256 is the stored one and it was
        trained on this model's file (:class:`ModelFileError` otherwise); ``None`` if there is none."""
        row = self.aux_model(model_id, kind)
        if row is None:
            return None
        backbone = self.model(model_id).sha256
        if row["backbone_sha256"] != backbone:
            raise ModelFileError(
                f"{kind} of model {model_id}: trained on a backbone with SHA-256 {row['backbone_sha256']}, "
                f"but the model's file has {backbone}; it is not loaded"
            )
        return verified_model_file(row["path"], row["sha256"], f"{kind} of model {model_id}")

    # ---------------------------------------------------------------- selections
    @unit_of_work
    def add_selection(
        self,
        iteration_id: int,
        model_id: int,
        selector: str,
        params: dict[str, Any],
        candidate_ids: Sequence[int],
        picked_ids: Sequence[int],
        scores: Sequence[float],
        info: dict[str, Any] | None = None,
    ) -> int:
        with self.session() as s, s.begin():
            row = models.Selection(
                iteration_id=iteration_id,
                model_id=model_id,
                selector=selector,
                params_json=json.dumps(params, default=str),
                candidate_ids=np.asarray(candidate_ids, dtype="<i8").tobytes(),
                picked_ids=np.asarray(picked_ids, dtype="<i8").tobytes(),
                scores=np.asarray(scores, dtype="<f8").tobytes(),
                info_json=json.dumps(info, default=str) if info else None,
            )
            s.add(row)
            s.flush()
            return row.id

    @unit_of_work
    def selection_for_iteration(self, iteration_id: int) -> dict[str, Any] | None:
        with self.session() as s:
            row = s.scalar(select(models.Selection).where(models.Selection.iteration_id == iteration_id))
            if row is None:
                return None
            return {
                "id": row.id,
                "selector": row.selector,
                "params": json.loads(row.params_json),
                "candidate_ids": _ids(row.candidate_ids),
                "picked_ids": _ids(row.picked_ids),
                "scores": np.frombuffer(row.scores, dtype="<f8").copy(),
                "info": json.loads(row.info_json) if row.info_json else {},
                "created_at": row.created_at,
            }

    @unit_of_work
    def selection_count(self, campaign_id: int) -> int:
        with self.session() as s:
            return s.scalar(
                select(func.count())
                .select_from(models.Selection)
                .join(models.Iteration, models.Iteration.id == models.Selection.iteration_id)
                .where(models.Iteration.campaign_id == campaign_id)
            )
