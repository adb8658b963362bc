"""Running an electronic-structure code as a child process in a per-job scratch directory.

Everything the subprocess labellers (Quantum ESPRESSO, CP2K, xtb, the generic external adapter, the
fault injector's hang) share lives here, so that timeouts, process-group kills, secret scrubbing and
scratch-directory retention behave identically for every code:

* a child is started in its own session, so a timeout kills the code *and* everything it spawned
  (MPI ranks, helper scripts) with one ``killpg``, never the Python process itself;
* it is started through :func:`alforge.lifetime.supervised` and tracked, so it dies with the campaign
  (even after ``kill -9``) and a SIGTERM/SIGINT of ``alforge run`` stops it at once;
* commands are argument lists; no shell is ever involved;
* environment additions may reference the caller's environment as ``"$env:NAME"``; such values are
  resolved at run time, treated as secrets, and scrubbed from every output tail and message;
* a failed job's scratch directory is kept for inspection (configurable), a successful one removed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from alforge import lifetime
from alforge.labelling.base import (
    FailureClass,
    Label,
    LabelFailure,
    Labeller,
    check_label,
    params_hash,
    provenance_metadata,
)
from alforge.structure_hash import canonical_hash

#: Prefix marking an environment value as a reference to the caller's environment (a secret).
ENV_REFERENCE = "$env:"
SECRET_REFERENCE = "$secret:"  # a Prefect Secret block, by name
#: How many trailing lines of a code's output are kept with a failure.
TAIL_LINES = 40
_SCRUBBED = "***"


class ProcessTimeout(Exception):
    """A child process ran past its time limit and its whole process group was killed."""


def default_scratch_root() -> Path:
    """``$ALFORGE_SCRATCH`` if set (a fast local disk on a cluster node), else the system temp dir."""
    return Path(os.environ.get("ALFORGE_SCRATCH") or Path(tempfile.gettempdir()) / "alforge-scratch")


def structure_digest(atoms: Atoms) -> str:
    """The first 16 hex digits of the store's canonical hash: names scratch directories and drives
    deterministic fault-injection rules, the same in every process and on every host."""
    return canonical_hash(atoms)[:16]


def _secret_block(name: str, key: str, context: str) -> str:
    from prefect.blocks.system import Secret  # only campaigns that use Prefect blocks need it here

    try:
        return str(Secret.load(name).get())
    except Exception as exc:
        raise LabelFailure(
            FailureClass.CRASH,
            f"{context}: Prefect Secret block {name!r} referenced by env[{key!r}] cannot be read "
            f"({type(exc).__name__})",
        ) from None


def resolve_env(env: Mapping[str, str] | None, context: str) -> tuple[dict[str, str], list[str]]:
    """Resolve ``"$env:NAME"`` (environment) and ``"$secret:NAME"`` (Prefect Secret block) references;
    return (values, secrets).

    Resolution happens at run time, on the host that runs the code, so a licence server address or a
    token never has to be written into a campaign file. A missing variable or block is a failure of
    this job (``CRASH``, never retried) whose message names it and the key that referenced it.
    """
    resolved: dict[str, str] = {}
    secrets: list[str] = []
    for key, value in (env or {}).items():
        value = str(value)
        if value.startswith(ENV_REFERENCE):
            name = value[len(ENV_REFERENCE):]
            if name not in os.environ:
                raise LabelFailure(
                    FailureClass.CRASH,
                    f"{context}: environment variable {name!r} referenced by env[{key!r}] is not set",
                )
            value = os.environ[name]
            if value:
                secrets.append(value)
        elif value.startswith(SECRET_REFERENCE):
            value = _secret_block(value[len(SECRET_REFERENCE):], key, context)
            if value:
                secrets.append(value)
        resolved[key] = value
    return resolved, secrets


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret value in ``text`` (longest first, so overlapping secrets vanish whole)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, _SCRUBBED)
    return text


def tail(paths: Iterable[Path], n_lines: int = TAIL_LINES) -> str:
    """The last ``n_lines`` lines of each existing, non-empty file, each headed by its name."""
    parts = []
    for path in paths:
        if not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        if lines:
            parts.append(f"--- {path.name} (last {min(n_lines, len(lines))} lines) ---")
            parts.extend(lines[-n_lines:])
    return "\n".join(parts)


def read_text(paths: Iterable[Path]) -> str:
    """Concatenated text of the existing files (for pattern searches over a code's output)."""
    return "\n".join(p.read_text(errors="replace") for p in paths if p.is_file())


def kill_process_group(proc: subprocess.Popen[Any]) -> None:
    """Stop a child started in its own session and everything in its process group (SIGTERM, then
    SIGKILL after :data:`alforge.lifetime.KILL_GRACE_S`; see :func:`alforge.lifetime.kill_groups`)."""
    lifetime.kill_groups([proc])


def _executable(name: str, env: Mapping[str, str] | None) -> str:
    """``name`` resolved as ``Popen`` would (on the child's ``PATH``), so a missing code is a
    ``FileNotFoundError`` here rather than an exit status of the supervisor."""
    path = shutil.which(name, path=(env if env is not None else os.environ).get("PATH"))
    if path is None:
        raise FileNotFoundError(f"{name}: executable not found" + ("" if os.sep in name else " on PATH"))
    return path


def run_process(
    argv: Sequence[str],
    cwd: Path,
    stdout_path: Path,
    stderr_path: Path,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    stdin_path: Path | None = None,
) -> int:
    """Run ``argv`` in ``cwd`` in a new session, supervised and tracked, and return its exit status.

    stdout and stderr go to files (a code's output can be large and must survive for the tail). On
    timeout, or if this process is interrupted, the child's whole process group is killed before the
    exception propagates, so no orphaned MPI rank keeps a core busy. A code killed because the
    campaign is stopping raises :class:`~alforge.lifetime.CampaignInterrupted`, not an exit status
    that the retry policy would answer by starting it again.
    """
    argv = [str(a) for a in argv]
    argv[0] = _executable(argv[0], env)
    with (
        open(stdout_path, "wb") as out,
        open(stderr_path, "wb") as err,
        open(stdin_path, "rb") if stdin_path is not None else open(os.devnull, "rb") as inp,
    ):
        with lifetime.spawning():
            proc = subprocess.Popen(
                lifetime.supervised(argv), cwd=cwd, stdin=inp, stdout=out, stderr=err,
                env=dict(env) if env is not None else None, start_new_session=True,
            )
            lifetime.track(proc)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_process_group(proc)
            raise ProcessTimeout(f"{argv[0]} exceeded the {timeout:g} s time limit") from None
        except BaseException:
            kill_process_group(proc)
            raise
        finally:
            lifetime.untrack(proc)
        lifetime.check_running()
        return status


def expand_launcher(mpi_launcher: Sequence[str] | None, cores: int) -> list[str]:
    """``["mpirun", "-np", "{cores}"]`` → ``["mpirun", "-np", "4"]``; ``{cores}`` only as a whole argument."""
    out = []
    for arg in mpi_launcher or ():
        if arg == "{cores}":
            out.append(str(cores))
        elif "{" in arg or "}" in arg:
            raise ValueError(
                f"mpi_launcher argument {arg!r}: the only placeholder is '{{cores}}', as a whole argument"
            )
        else:
            out.append(arg)
    return out


class ScratchLabeller(Labeller):
    """Base for labellers that run a code in a per-job scratch directory.

    Subclasses implement :meth:`_compute` (write input, run, parse) and set ``output_names`` (files
    whose tail explains a failure), ``not_converged`` (a regex for the code's own non-convergence
    message) and ``version_re`` (a regex whose first group is the version in the output header).
    This class turns whatever happens into a :class:`Label` with provenance, or a classified
    :class:`LabelFailure` with a scrubbed output tail, and decides whether the directory stays.
    """

    output_names: tuple[str, ...] = ()
    not_converged: re.Pattern[str] | None = None
    version_re: re.Pattern[str] | None = None

    def __init__(
        self,
        *,
        timeout: float | None = None,
        cores: int = 1,
        mpi_launcher: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        scratch_root: str | os.PathLike[str] | None = None,
        keep_failed: bool = True,
        max_force: float | None = None,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"{self.name} labeller: timeout must be positive, got {timeout!r}")
        if int(cores) < 1:
            raise ValueError(f"{self.name} labeller: cores must be >= 1, got {cores!r}")
        self.timeout = timeout
        self.cores = int(cores)
        self.mpi_launcher = list(mpi_launcher or [])
        self._launcher = expand_launcher(self.mpi_launcher, self.cores)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.scratch_root = Path(scratch_root) if scratch_root is not None else None
        self.keep_failed = keep_failed
        self.max_force = max_force
        self.last_version = ""
        self._secrets: list[str] = []

    # -- to implement -------------------------------------------------------------------------
    def _compute(self, atoms: Atoms, workdir: Path) -> tuple[float, np.ndarray, np.ndarray | None]:
        """Run the code on ``atoms`` in ``workdir``; return (energy eV, forces eV/Å, stress eV/Å³ 3×3)."""
        raise NotImplementedError

    def _params(self) -> dict[str, Any]:
        """The parameters that determine the physics (hashed into provenance; no paths, no secrets)."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """Version as last read from the code's own output header ("" before the first run)."""
        return {
            "code": self.name,
            "version": self.last_version,
            "params_hash": params_hash({"code": self.name, **self._params()}),
        }

    def _child_env(self) -> dict[str, str]:
        """The caller's environment plus thread count and resolved additions (secrets noted)."""
        resolved, self._secrets = resolve_env(self.env, f"{self.name} labeller")
        return {**os.environ, "OMP_NUM_THREADS": str(self.cores), **resolved}

    def _run(self, argv: Sequence[str], workdir: Path, stdout: str, stderr: str, stdin: str | None = None) -> int:
        """Run one command of this job with the configured launcher, environment and time limit."""
        return run_process(
            [*self._launcher, *argv], workdir, workdir / stdout, workdir / stderr,
            timeout=self.timeout, env=self._child_env(),
            stdin_path=workdir / stdin if stdin is not None else None,
        )

    def _make_workdir(self, atoms: Atoms) -> Path:
        root = self.scratch_root or default_scratch_root()
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{self.name}-{structure_digest(atoms)}-", dir=root))

    def label(self, atoms: Atoms) -> Label:
        workdir = self._make_workdir(atoms)
        self._secrets = []
        start = time.perf_counter()
        try:
            try:
                energy, forces, stress = self._compute(atoms, workdir)
            except ProcessTimeout as exc:
                raise LabelFailure(FailureClass.TIMEOUT, f"{self.name}: {exc}") from None
            except LabelFailure:
                raise
            except Exception as exc:  # the code or its parser failed: classify from its output
                reason = self._error_summary(read_text(self._output_paths(workdir)))
                reason = reason or f"{type(exc).__name__}: {exc}"
                evidence = self._not_converged_evidence(workdir)
                if evidence:
                    raise LabelFailure(
                        FailureClass.SCF_NOT_CONVERGED, f"{self.name}: SCF not converged: {evidence!r} ({reason})"
                    ) from None
                raise LabelFailure(FailureClass.CRASH, f"{self.name}: {reason}") from None
            evidence = self._not_converged_evidence(workdir)
            if evidence:
                raise LabelFailure(
                    FailureClass.SCF_NOT_CONVERGED,
                    f"{self.name}: SCF not converged: {evidence!r} (although results were written)",
                )
            self._read_version(workdir)
            wall = time.perf_counter() - start
            label = Label(float(energy), np.asarray(forces, dtype=float),
                          None if stress is None else np.asarray(stress, dtype=float),
                          provenance_metadata(self.provenance(), wall))
            check_label(label, len(atoms), self.max_force)
        except LabelFailure as failure:
            self._read_version(workdir)
            kept = self.keep_failed
            failure.message = scrub(failure.message, self._secrets)
            if kept:
                failure.message += f" [scratch kept: {workdir}]"
            failure.args = (failure.message,)
            failure.output_tail = scrub(self._tail(workdir) or failure.output_tail, self._secrets)
            failure.metadata = {
                **provenance_metadata(self.provenance(), time.perf_counter() - start),
                "structure": structure_digest(atoms),
                "scratch": str(workdir) if kept else None,
                **failure.metadata,
            }
            if not kept:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        shutil.rmtree(workdir, ignore_errors=True)
        return label

    def _error_summary(self, output: str) -> str:
        """The code's own one-line error message from its output, if it printed one ("" if not)."""
        return ""

    def _output_paths(self, workdir: Path) -> list[Path]:
        return [workdir / name for name in self.output_names]

    def _tail(self, workdir: Path) -> str:
        return tail(self._output_paths(workdir))

    def _not_converged_evidence(self, workdir: Path) -> str:
        """The output line where the code says its SCF did not converge ("" if it never says so).

        Quoted in the failure message because codes print it mid-output: it is often not in the tail.
        """
        if self.not_converged is None:
            return ""
        text = read_text(self._output_paths(workdir))
        match = self.not_converged.search(text)
        if match is None:
            return ""
        end = text.find("\n", match.end())
        return text[text.rfind("\n", 0, match.start()) + 1:end if end >= 0 else len(text)].strip()

    def _read_version(self, workdir: Path) -> None:
        if self.version_re is not None:
            match = self.version_re.search(read_text(self._output_paths(workdir)))
            if match:
                self.last_version = match.group(1).strip()

