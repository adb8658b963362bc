"""``alforge`` command line: parses arguments and calls flows or reads the store, nothing more.

    alforge run CAMPAIGN.yaml [--wait] [--accept-changes] [--verbose]
                                         (exit status 3: paused by the labelling failure budget;
                                          143/130: stopped by SIGTERM/SIGINT, codes killed)
    alforge status   [--config CAMPAIGN.yaml | --store URL] [--campaign NAME] [--json]
    alforge export   [--config ... | --store ...] --campaign NAME --out train.extxyz [--model FILE] [--test]
    alforge import   FILE [--config ... | --store ...] --campaign NAME [--energy-key ...]
    alforge retry    CAMPAIGN.yaml [--class crash,scf_not_converged] [--role seed,test,candidate]
    alforge --version                    (alforge, torch, mace-torch and prefect versions)
    alforge server   start|stop|status [--port 4200] [--state DIR]   (a local Prefect server, PID file)
    alforge deploy   CAMPAIGN.yaml [--cron "0 2 * * *"] [--pool NAME] [--name NAME] [--set key=value ...]
    alforge worker   [--pool NAME] [--limit N]          (a Prefect process worker for the pool)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path


#: Seconds to wait for Prefect's ephemeral API server; its 20 s default is too short on a loaded node.
PREFECT_STARTUP_TIMEOUT_S = 600
#: Prefect settings contexts held for the rest of this (one-command) process.
_PROCESS_SETTINGS = contextlib.ExitStack()


class _NoTracebacks(logging.Filter):
    """On the console a failure is the CLI's one line; Prefect's tracebacks stay in its API and UI
    (``--debug`` shows them here as well)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def _prefect_defaults(debug: bool = False, verbose: bool = False) -> None:
    """Prefect settings for this command, before it starts a flow. A user's own setting (environment,
    profile or prefect.toml) always wins over these defaults. Unless ``verbose``, the console shows
    only the campaign's summaries, warnings and errors (:class:`alforge.monitoring.terminal.QuietConsole`)."""
    # Before Prefect is imported: no telemetry lookups (the machine may be offline), neither the
    # server's nor the client's (whose first-run notice would also print on a terminal).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import prefect.main  # noqa: F401 - sets up Prefect's logging, which the filter below joins
    from prefect.logging.handlers import PrefectConsoleHandler
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT
    from prefect.settings import get_current_settings, temporary_settings

    if "startup_timeout_seconds" not in get_current_settings().server.ephemeral.model_fields_set:
        # Prefect read its settings when imported, so a default now is a settings context.
        _PROCESS_SETTINGS.enter_context(temporary_settings(updates={STARTUP_TIMEOUT: PREFECT_STARTUP_TIMEOUT_S}))
    from alforge.monitoring.terminal import QuietConsole

    wanted = ([] if debug else [_NoTracebacks]) + ([] if verbose else [QuietConsole])
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            for kind in wanted:
                if not any(isinstance(f, kind) for f in handler.filters):
                    handler.addFilter(kind())


def _store_url(args: argparse.Namespace) -> str:
    if args.store:
        return args.store
    if args.config:
        from alforge.config import load_config

        return str(load_config(args.config, check_device=False).store)
    env = os.environ.get("ALFORGE_STORE")
    if env:
        return env
    raise SystemExit("alforge: name the store with --config CAMPAIGN.yaml, --store URL or $ALFORGE_STORE")


def _campaign_name(args: argparse.Namespace, required: bool) -> str | None:
    if args.campaign:
        return args.campaign
    if args.config:
        from alforge.config import load_config

        return load_config(args.config, check_device=False).name
    if required:
        raise SystemExit("alforge: give --campaign NAME (or --config CAMPAIGN.yaml)")
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from alforge.config import load_config
    from alforge.monitoring.terminal import ProgressDisplay, console_of
    from alforge.sources import check_sources

    cfg = load_config(args.config_file)  # fail on a bad file before Prefect starts or a store exists
    check_sources(cfg.seeds, require_forces=True)
    check_sources([*cfg.test, *cfg.targets], require_forces=False)
    _prefect_defaults(args.debug, args.verbose)
    from alforge.flows.campaign import campaign
    from alforge.lifetime import CampaignInterrupted, handle_termination

    handle_termination()  # SIGTERM/SIGINT: kill the running codes, unwind, exit 128 + signum
    try:
        with ProgressDisplay(console_of(logging.getLogger().handlers)):
            result = campaign(str(Path(args.config_file).resolve()), wait=args.wait, accept_changes=args.accept_changes)
    except CampaignInterrupted as exc:
        print(f"alforge: {exc}; its unfinished labels run again on resume", file=sys.stderr)
        return exc.code
    if result["paused"]:
        print(f"campaign {result['campaign']!r} is paused: {result['stop_reason']}", file=sys.stderr)
        return 3
    print(f"campaign {result['campaign']!r} finished: {result['stop_reason']}")
    return 0


def _fmt(value: object, scale: float = 1000.0) -> str:
    return f"{value * scale:.1f}" if isinstance(value, (int, float)) else "-"


def cmd_status(args: argparse.Namespace) -> int:
    from alforge.storage import Store

    store = Store(_store_url(args), create=False)  # a mistyped URL is named, not created
    name = _campaign_name(args, required=False)
    campaigns = [c for c in store.campaigns() if name is None or c.name == name]
    if getattr(args, "json", False):
        import json

        from alforge.results import campaign_status

        print(json.dumps([campaign_status(store, c) for c in campaigns], indent=1))
        return 1 if name and not campaigns else 0
    if not campaigns:
        print(f"no campaign{' named ' + repr(name) if name else 's'} in {store.url}")
        return 1 if name else 0
    for c in campaigns:
        counts = store.label_counts(c.id)
        n_struct = {r: len(store.structure_ids(c.id, role=r)) for r in ("seed", "candidate", "test")}
        print(f"campaign {c.name}  [{c.status}]{'  ' + c.status_message if c.status_message else ''}")
        print(
            f"  structures: {n_struct['seed']} seed, {n_struct['candidate']} candidate, {n_struct['test']} test"
            f" | labels: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed,"
            f" {counts.get('pending', 0) + counts.get('running', 0)} pending"
            f" | features: {store.feature_count(c.id)} | selections: {store.selection_count(c.id)}"
        )
        failures = store.failure_counts(c.id)
        quarantined = store.quarantined_ids(c.id)
        if failures or quarantined:
            by_class = ", ".join(f"{n} {cls}" for cls, n in sorted(failures.items()))
            print(f"  failures: {by_class or 'none'} | quarantined structures: {len(quarantined)}")
        models = {m.iteration_index: m for m in store.models(c.id)}
        print("  iter  candidates  selected  n_train  F-RMSE train/valid/test (meV/Å)  E-RMSE test (meV/atom)  stop")
        for it in store.iterations(c.id):
            m = models.get(it.index)
            sel = store.selection_for_iteration(it.id)
            mt = m.metrics if m else {}
            print(
                # candidates the selector weighed: this iteration's MD frames and the unlabelled pool
                f"  {it.index:>4}  {len(sel['candidate_ids']) if sel else 0:>10}"
                f"  {len(sel['picked_ids']) if sel else 0:>8}  {mt.get('n_train', '-'):>7}"
                f"  {_fmt(mt.get('train_forces_rmse')):>9} / {_fmt(mt.get('valid_forces_rmse'))} /"
                f" {_fmt(mt.get('test_forces_rmse'))}"
                f"  {_fmt(mt.get('test_energy_rmse_per_atom')):>22}  {it.stop_reason or ''}"
            )
        curve = store.learning_curve(c.id)
        if curve:
            print(
                "  learning curve (labels: test E-RMSE meV/atom, F-RMSE meV/Å): "
                + ", ".join(
                    f"{p['n_labels']}: {_fmt(p['test_energy_rmse_per_atom'])}, {_fmt(p['test_forces_rmse'])}"
                    for p in curve
                )
            )
        if models:
            latest = models[max(models)]
            print(f"  latest model: {latest.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from alforge.results import NoModelError, export
    from alforge.storage import Store

    store = Store(_store_url(args), create=False)
    name = _campaign_name(args, required=True)
    try:
        done = export(store, name, Path(args.out), model=Path(args.model) if args.model else None, test=args.test)
    except NoModelError as exc:
        raise SystemExit(f"alforge: {exc}") from None
    print(f"wrote {done.n_structures} labelled structures of {name!r} to {args.out}")
    if done.model_iteration is not None:
        print(f"wrote the model of iteration {done.model_iteration} to {args.model} (mace's format)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from alforge.config import StructureSource

    source = StructureSource(
        file=Path(args.file).resolve(),
        index=args.index,
        format=args.format,
        energy_key=args.energy_key,
        forces_key=args.forces_key,
        stress_key=args.stress_key,
    )
    if not source.file.exists():
        raise SystemExit(f"alforge: {source.file}: no such file")
    from alforge.sources import check_sources

    check_sources([source], require_forces=True, labelled=True)  # before a store exists
    url = _store_url(args)
    name = _campaign_name(args, required=True)
    _prefect_defaults(args.debug)
    from alforge.flows.importing import import_dataset
    from alforge.tasks.common import store_handle

    import_dataset(store_handle(url), name, source, role=args.role)
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Failed labels are retried only when asked: the next ``alforge run`` computes these again."""
    from alforge.config import load_config
    from alforge.labelling.base import FailureClass
    from alforge.storage import Store

    def listed(value: str | None, known: set[str], what: str) -> list[str] | None:
        items = [v.strip() for v in value.split(",") if v.strip()] if value else []
        unknown = sorted(set(items) - known)
        if unknown:
            raise SystemExit(f"alforge: unknown {what} {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
        return items or None

    classes = listed(args.classes, {f.value for f in FailureClass}, "failure class(es)")
    roles = listed(args.roles, {"seed", "test", "candidate"}, "role(s)")
    cfg = load_config(args.campaign_file, check_device=False)
    store = Store(str(cfg.store), create=False)
    n = store.reset_failed_labels(store.campaign_id(cfg.name), classes=classes, roles=roles)
    print(f"campaign {cfg.name!r}: {n} failed label(s) back to pending; `alforge run` computes them again")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """A local Prefect server for the UI and for deployments (:mod:`alforge.service`)."""
    from alforge import service

    state = service.state_dir(args.state)
    try:
        if args.action == "start":
            st = service.start_server(state, port=args.port, timeout=args.timeout)
            print(f"Prefect server running (pid {st.pid}): UI {st.ui_url}  API {st.api_url}")
            print(f"state and log: {state}  (the UI is told its API URL: PREFECT_UI_API_URL={st.api_url})")
            print("point flows, `alforge deploy` and workers at it with:")
            print(f"export PREFECT_API_URL={st.api_url}")
            return 0
        if args.action == "stop":
            stopped = service.stop_server(state)
            print("Prefect server stopped" if stopped else f"no Prefect server running from {state}")
            return 0
        st = service.server_status(state)
    except service.ServiceError as exc:
        raise SystemExit(f"alforge: {exc}") from None
    if not st.running:
        print(f"no Prefect server running from {state}")
        return 1
    print(f"Prefect server pid {st.pid}: {'healthy' if st.healthy else 'NOT answering'} at {st.api_url} (UI {st.ui_url})")
    return 0 if st.healthy else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    """A deployment of the campaign flow for one campaign file, on a process work pool."""
    from alforge import service

    try:
        overrides = service.parse_overrides(args.set or [])
        api = service.resolve_api_url(service.state_dir(args.state))
        _prefect_defaults(args.debug)
        dep = service.deploy_campaign(
            args.config_file, api=api, pool=args.pool, name=args.name, cron=args.cron, overrides=overrides
        )
    except service.ServiceError as exc:
        raise SystemExit(f"alforge: {exc}") from None
    schedule = f"cron {args.cron!r} (UTC)" if args.cron else "no schedule (runs when triggered)"
    print(f"deployment {dep.name!r} ({dep.id}) on work pool {dep.pool!r} at {dep.api_url}: {schedule}")
    print(f"start a worker:  alforge worker --pool {dep.pool}")
    print(f"run it now:      prefect deployment run {dep.name!r}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Become ``prefect worker start`` for a process pool; it runs the deployments' flow runs."""
    from alforge import service

    try:
        api = service.resolve_api_url(service.state_dir(args.state))
    except service.ServiceError as exc:
        raise SystemExit(f"alforge: {exc}") from None
    print(f"starting a Prefect worker for pool {args.pool!r} on {api}", flush=True)
    service.exec_worker(args.pool, api, limit=args.limit)
    return 0  # not reached: exec_worker replaces this process


def version_line() -> str:
    """``alforge <version> (torch …, mace-torch …, prefect …)``: the versions a bug report needs,
    read from package metadata so nothing heavy is imported."""
    from importlib import metadata

    from alforge import __version__

    def installed(package: str) -> str:
        try:
            return f"{package} {metadata.version(package)}"
        except metadata.PackageNotFoundError:
            return f"{package} not installed"

    return f"alforge {__version__} ({', '.join(installed(p) for p in ('torch', 'mace-torch', 'prefect'))})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    parser.add_argument("--version", action="version", version=version_line(), help="print the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run or resume a campaign")
    p.add_argument("config_file")
    p.add_argument("--wait", action="store_true", help="if another run owns the campaign, wait for it to finish")
    p.add_argument(
        "--accept-changes", action="store_true",
        help="go on with changed MLIP settings (they do not change the labels; a new labeller means a new campaign)",
    )
    p.add_argument(
        "--verbose", action="store_true",
        help="show everything: Prefect's per-task lines, per-epoch training lines, third-party warnings",
    )
    p.set_defaults(func=cmd_run)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="campaign file (its store and name are used)")
        p.add_argument("--store", help="SQLAlchemy URL of the store")
        p.add_argument("--campaign", help="campaign name")

    p = sub.add_parser("status", help="campaigns, iterations, counts and errors")
    store_args(p)
    p.add_argument("--json", action="store_true", help="print counts and the learning curve as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write the labelled set as extxyz (and copy the latest model)")
    store_args(p)
    p.add_argument("--out", required=True, help="output file (extxyz)")
    p.add_argument("--model", help="write the latest model here, in mace's format (MACECalculator(model_paths=...))")
    p.add_argument("--test", action="store_true", help="include the labelled test set")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="load a labelled dataset as seeds")
    p.add_argument("file")
    store_args(p)
    p.add_argument("--index", default=":")
    p.add_argument("--format", default=None)
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--role", choices=("seed", "test"), default="seed")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("retry", help="put failed, non-quarantined labels back to pending for the next run")
    p.add_argument("campaign_file", metavar="CAMPAIGN", help="campaign file")
    p.add_argument("--class", dest="classes", help="only these failure classes (comma-separated, e.g. crash,scf_not_converged)")
    p.add_argument("--role", dest="roles", help="only structures of these roles (comma-separated: seed,test,candidate)")
    p.set_defaults(func=cmd_retry)

    from alforge.service import DEFAULT_POOL, DEFAULT_PORT, STARTUP_TIMEOUT_S

    def state_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state", help="the server's state dir (default: $ALFORGE_HOME/prefect or ~/.alforge/prefect)")

    p = sub.add_parser("server", help="start, stop or check a local Prefect server (UI and deployments)")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")
    p.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S, help="seconds start waits for the server's health check")
    state_arg(p)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("deploy", help="create or update a Prefect deployment of a campaign (process work pool)")
    p.add_argument("config_file", metavar="CAMPAIGN", help="campaign file")
    p.add_argument("--cron", help='schedule, a cron string in UTC, e.g. "0 2 * * *"')
    p.add_argument("--pool", default=DEFAULT_POOL, help=f"process work pool, created if missing (default {DEFAULT_POOL})")
    p.add_argument("--name", help="deployment name (default: the campaign's name)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting for this deployment's runs, e.g. --set stopping.max_iterations=3 (repeatable)")
    state_arg(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("worker", help="run a Prefect worker that executes the pool's campaign runs")
    p.add_argument("--pool", default=DEFAULT_POOL, help=f"work pool to poll (default {DEFAULT_POOL})")
    p.add_argument("--limit", type=int, help="at most this many flow runs at once")
    state_arg(p)
    p.set_defaults(func=cmd_worker)
    return parser


def _message(exc: BaseException) -> str:
    """The exception's message (a KeyError's without the quotes its ``str`` adds)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for errors that are not alforge's own."""
    lines = _message(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. A failure is one named line on stderr (the traceback with ``--debug``):
    exit status 2 for a bad input (campaign file, structure file, store, name), 1 for anything else."""
    from alforge.config import ConfigError
    from alforge.sources import SourceError
    from alforge.storage.urls import StoreError

    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        from alforge.monitoring.terminal import silence_third_party_warnings

        silence_third_party_warnings()  # before anything imports e3nn (a campaign file's irreps check does)
    try:
        return args.func(args)
    except (ConfigError, SourceError, StoreError, KeyError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"alforge: {_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's last word on any failure is one line
        if args.debug:
            traceback.print_exc()
        print(f"alforge: {_one_line(exc)}" + ("" if args.debug else " (--debug for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
