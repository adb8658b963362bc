"""The campaign file: YAML validated with pydantic before any work starts.

Every error names the file, the dotted field path and what was expected, e.g.
``campaign.yaml: selector.batch_size: Input should be greater than 0 (got -3)``.
Relative paths are resolved against the campaign file's folder.

Everything that can be checked without doing work is checked here, so a campaign never spends
labels before failing on a setting: every number is finite (free-form ``params``/``kwargs`` too),
a key given twice is an error (PyYAML would keep the last one silently), ``mlip.mlp_irreps`` is
parsed by e3nn, ``mlip.device`` must exist on this machine (skipped by read-only commands, which
may run elsewhere), and ASE calculator kwargs must be parameters the calculator knows.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from alforge.mlip.params import MACEParams
from alforge.storage.urls import StoreError, check_store_reference, redact_url


class ConfigError(ValueError):
    """A campaign file that cannot be used; the message names the file and field."""


class _Strict(BaseModel):
    # NaN slips through every range check (NaN > 0 is False, and so is NaN <= 0): refuse it outright.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _non_finite(value: Any, where: str) -> list[str]:
    """Dotted paths of every NaN/±inf inside a free-form value (dicts and lists of any depth)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{where} = {value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{where}.{i}")]
    return []


def _finite_mapping(value: dict[str, Any], name: str) -> dict[str, Any]:
    bad = _non_finite(value, name)
    if bad:
        raise ValueError(f"numbers must be finite, got {', '.join(bad)}")
    return value


def _check_device(device: str) -> str:
    """``auto`` always works (CUDA when visible, else the CPU); ``cuda[:k]`` only with that GPU."""
    if device in ("auto", "cpu"):
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= count:
        seen = f"{count} CUDA device(s) (indices 0..{count - 1})" if count else "no CUDA device"
        raise ValueError(f"device {device!r} is not available: torch sees {seen}; use 'auto' or 'cpu'")
    return device


class MLIPConfig(MACEParams):
    """The MACE hyperparameters of :class:`MACEParams`, checked as a campaign file needs them:
    finite numbers, irreps e3nn can parse, a device this machine has."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("mlp_irreps")
    @classmethod
    def _irreps(cls, v: str) -> str:
        from alforge.mlip.e3nn_import import e3nn_o3  # imports torch: only when irreps are checked

        try:
            irreps = e3nn_o3().Irreps(v)
        except (ValueError, AssertionError) as exc:
            raise ValueError(f"not an e3nn irreps string ({exc}); expected e.g. '16x0e'") from None
        # MACE's readout MLP applies one gate to one block of even scalars (mace.modules.blocks).
        if len(irreps) != 1 or irreps[0].ir != (0, 1) or irreps[0].mul < 1:
            raise ValueError(f"the readout MLP takes one block of even scalars 'Nx0e' (N >= 1), got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str, info: ValidationInfo) -> str:
        if info.context and not info.context.get("check_device", True):
            return v
        return _check_device(v)


class GenerateSpec(_Strict):
    """Structures generated from an ASE bulk crystal: supercells, randomly strained and rattled."""

    element: str
    crystal: str = "fcc"
    a: float | None = Field(None, gt=0, description="lattice constant in Å (ASE's default if omitted)")
    cubic: bool = True
    supercells: list[tuple[int, int, int]] = [(1, 1, 1)]
    count: int = Field(10, ge=1)
    rattle: float = Field(0.05, ge=0, description="Gaussian σ of atomic displacements, Å")
    strain: float = Field(0.02, ge=0, description="max |ε| of a random symmetric strain")
    vacancies: int = Field(0, ge=0, description="atoms removed at random from each structure")
    seed: int = 0

    @field_validator("element")
    @classmethod
    def _known_element(cls, v: str) -> str:
        from ase.data import atomic_numbers

        if v not in atomic_numbers:
            raise ValueError(f"unknown chemical symbol {v!r}")
        return v


class StructureSource(_Strict):
    """Either ``file`` (anything ``ase.io.read`` takes) or ``generate``."""

    file: Path | None = None
    index: str = ":"
    format: str | None = None
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    generate: GenerateSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "StructureSource":
        if (self.file is None) == (self.generate is None):
            raise ValueError("give exactly one of 'file' or 'generate'")
        return self


class ExplorationConfig(_Strict):
    """Where candidates come from: Langevin MD with the current model (METHODS: candidates come from
    the model's own dynamics), a fixed ``pool`` of structures, or both.

    With a ``pool`` and no ``walkers`` setting no MD runs (``walkers: 0``); every unlabelled,
    non-quarantined pool structure is a candidate in every iteration, beside that iteration's MD frames.
    """

    pool: list[StructureSource] = Field(
        [], description="fixed candidate structures (files read in chunks; labels in them are not used as labels)"
    )
    walkers: int = Field(4, ge=0, description="MD walkers per iteration; default 4, or 0 when a pool is given")
    temperatures: list[float] = Field([300.0, 800.0], min_length=1)
    timestep_fs: float = Field(2.0, gt=0)
    steps: int = Field(200, ge=1)
    frame_interval: int = Field(10, ge=1)
    friction_per_fs: float = Field(0.01, gt=0)
    min_distance: float = Field(1.5, gt=0, description="stop a trajectory when two atoms come closer (Å)")
    max_energy_change: float = Field(
        1.0, gt=0, description="stop when |E - E_start| per atom exceeds this (eV/atom): exploding dynamics"
    )
    gamma_hi: float | None = Field(
        None, gt=1, description="stop when the MaxVol extrapolation grade of a frame exceeds this (METHODS §3)"
    )
    probe_min_reliable: float | None = Field(
        None, gt=0, lt=1, description="stop a walker at a frame whose PROBE p_reliable is below this (METHODS §6)"
    )
    ltau_max: float | None = Field(
        None, gt=0, lt=1, description="stop a walker at a frame whose largest atom LTAU p exceeds this (METHODS §7)"
    )
    supercell: tuple[PositiveInt, PositiveInt, PositiveInt] | None = Field(
        None, description="repeat each walker's periodic start structure n1 × n2 × n3 before MD: large cells "
        "(e.g. ≥ 500 atoms) whose least rigid environments the lpr selector carves"
    )

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError(f"temperatures must be > 0 K, got {v}")
        return v

    @model_validator(mode="after")
    def _some_candidates(self) -> "ExplorationConfig":
        if self.pool and "walkers" not in self.model_fields_set:
            self.walkers = 0
        if self.walkers == 0 and not self.pool:
            raise ValueError("walkers: 0 needs a 'pool' of candidate structures (else nothing is ever selected)")
        return self


class SelectorConfig(_Strict):
    name: str = "mig"
    params: dict[str, Any] = {}
    batch_size: int = Field(10, ge=1)

    @field_validator("params")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _finite_mapping(v, "params")

    @model_validator(mode="after")
    def _buildable(self) -> "SelectorConfig":
        from alforge.selectors import make_selector

        make_selector(self.name, **self.params)  # raises ValueError naming the selector
        return self


class LabellerConfig(_Strict):
    """Who labels, how many jobs at once, and what a failure costs (see alforge/labelling/policy.py)."""

    name: str = Field("emt", description="a registered labeller or a 'module:factory' returning an ASE calculator")
    kwargs: dict[str, Any] = {}
    max_force: float | None = Field(None, gt=0, description="|F| above this (eV/Å) is an implausible label")
    concurrency: int = Field(1, ge=1, description="labelling jobs run at the same time")
    retries: dict[str, int] = Field({}, description="per failure class, overrides the default retry counts")
    quarantine_after: int = Field(3, ge=1, description="failed attempts after which a structure is never offered again")
    max_failed: int | None = Field(None, ge=0, description="pause the campaign once more labels than this failed")
    max_failed_fraction: float | None = Field(
        0.5, gt=0, le=1, description="pause once this fraction of finished labels failed (checked from 10 on)"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from alforge.labelling.ase_calculator import resolve_factory
        from alforge.labelling.registry import LABELLERS

        if v not in LABELLERS:
            resolve_factory(v)  # raises ValueError naming v (built-in ASE names or module:factory)
        return v

    @field_validator("kwargs")
    @classmethod
    def _finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _finite_mapping(v, "kwargs")

    @field_validator("retries")
    @classmethod
    def _failure_classes(cls, v: dict[str, int]) -> dict[str, int]:
        from alforge.labelling.base import FailureClass

        known = {f.value for f in FailureClass}
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"unknown failure class(es) {bad}; expected some of {sorted(known)}")
        if any(n < 0 for n in v.values()):
            raise ValueError("retry counts must be >= 0")
        return v

    @model_validator(mode="after")
    def _buildable(self) -> "LabellerConfig":
        from alforge.labelling.registry import make_labeller

        try:
            make_labeller(self.name, **self.labeller_kwargs())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"labeller {self.name!r} cannot be built from its kwargs: {exc}") from None
        return self

    def labeller_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.kwargs)
        if self.max_force is not None:
            kwargs.setdefault("max_force", self.max_force)
        return kwargs


class UncertaintyConfig(_Strict):
    """The one last-layer Hessian per model behind every selector, PR/LPR/CPR and σ² (METHODS §2).

    Its row weights (λ_E per-atom energy, λ_F forces, λ_σ stress) are read from the model's own
    training settings, so ``H`` is the Gauss–Newton Hessian of the loss the model was trained with.
    """

    hessian: Literal["loss", "energy"] = Field(
        "loss", description="'loss': energy + force (+ stress) rows as trained; 'energy': energy rows only"
    )
    regularizer: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="ς in H = data + ς² I; null: from the readout weight decay, else by the held-out "
        "likelihood of the calibrated σ² on the model's validation split (recorded per iteration)",
    )


class StoppingConfig(_Strict):
    max_iterations: int = Field(3, ge=1, description="models trained; labelling happens between them")
    label_budget: int | None = Field(None, ge=1, description="labels of selected candidates, all iterations")
    target_forces_rmse: float | None = Field(None, gt=0, description="stop once the test force RMSE (eV/Å) is below")
    min_informative: int = Field(1, ge=0, description="stop when fewer candidates than this score >= min_score")
    min_score: float = 0.0


def _slurm_cluster_kwargs() -> set[str]:
    """Every keyword ``dask_jobqueue.SLURMCluster`` takes (its own, its job's and the base job's)."""
    import inspect

    from dask_jobqueue.core import Job, JobQueueCluster
    from dask_jobqueue.slurm import SLURMJob

    names = set()
    for fn in (JobQueueCluster.__init__, Job.__init__, SLURMJob.__init__):
        names |= {p for p in inspect.signature(fn).parameters if p not in ("self", "scheduler", "name")}
    return names - {"base_class_kwargs", "job_kwargs", "job_cls", "asynchronous", "loop"}


class ExecutionConfig(_Strict):
    """Where labels and MD walkers run (alforge/flows/execution.py): a thread pool in the campaign's
    process (``thread``, the default), or Dask (``dask``): a local cluster of worker processes
    (``cluster: local``), a SLURM cluster of batch jobs (``cluster: slurm``, dask-jobqueue), or
    the scheduler of a cluster already running (``address``)."""

    task_runner: Literal["thread", "dask"] = "thread"
    address: str | None = Field(None, description="scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786")
    cluster: Literal["local", "slurm"] | None = Field(None, description="start a Dask cluster for the run")
    n_workers: int | None = Field(
        None, ge=1, description="cluster: local: worker processes (one thread each); default "
        "labeller.concurrency for labels, exploration.walkers for MD"
    )
    cluster_kwargs: dict[str, Any] = Field(
        {}, description="cluster: slurm: dask_jobqueue.SLURMCluster keywords (queue, cores, memory, walltime, ...); "
        "processes defaults to cores (one thread per worker process)"
    )
    adapt_kwargs: dict[str, Any] = Field(
        {}, description="scale the started cluster with cluster.adapt(**adapt_kwargs), e.g. {minimum: 0, maximum: 8}"
    )

    @field_validator("cluster_kwargs", "adapt_kwargs")
    @classmethod
    def _finite(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _finite_mapping(v, info.field_name or "kwargs")

    @model_validator(mode="after")
    def _consistent(self) -> "ExecutionConfig":
        given = [k for k in ("address", "cluster", "n_workers") if getattr(self, k) is not None]
        given += [k for k in ("cluster_kwargs", "adapt_kwargs") if getattr(self, k)]
        if self.task_runner == "thread":
            if given:
                raise ValueError(f"{', '.join(given)}: Dask settings need task_runner: dask")
            return self
        if (self.address is None) == (self.cluster is None):
            raise ValueError("task_runner: dask needs exactly one of 'address' (a running scheduler) or 'cluster'")
        if self.address is not None and (self.n_workers is not None or self.cluster_kwargs or self.adapt_kwargs):
            raise ValueError("address: a running cluster takes no n_workers, cluster_kwargs or adapt_kwargs")
        if self.cluster == "local" and self.cluster_kwargs:
            raise ValueError("cluster_kwargs are for cluster: slurm; a local cluster takes n_workers")
        if self.cluster == "slurm":
            if self.n_workers is not None:
                raise ValueError("n_workers is for cluster: local; size a SLURM cluster with adapt_kwargs")
            unknown = sorted(set(self.cluster_kwargs) - _slurm_cluster_kwargs())
            if unknown:
                raise ValueError(f"cluster_kwargs: SLURMCluster takes no {', '.join(map(repr, unknown))}")
            missing = [k for k in ("cores", "memory") if k not in self.cluster_kwargs]
            if missing:
                raise ValueError(f"cluster_kwargs: SLURMCluster needs {' and '.join(missing)} (per job)")
        return self


class CampaignConfig(_Strict):
    name: str
    store: str | None = Field(
        None,
        description="SQLAlchemy URL, or '$env:NAME' / '$secret:NAME' (an environment variable or Prefect "
        "Secret holding it, so a password stays out of the file); default: SQLite file beside the campaign file",
    )
    workdir: Path | None = Field(None, description="models and scratch; default: runs/<name> beside the file")
    seed: int = 0
    seeds: list[StructureSource] = Field(min_length=1)
    test: list[StructureSource] = []
    targets: list[StructureSource] = Field(
        [], description="unlabelled structures of interest for target-aware selectors (mmig, qopt, pr_augment)"
    )
    mlip: MLIPConfig = Field(default_factory=MLIPConfig)
    exploration: ExplorationConfig = ExplorationConfig()
    selector: SelectorConfig = SelectorConfig()
    labeller: LabellerConfig = LabellerConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()
    stopping: StoppingConfig = StoppingConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("name must be letters, digits, '_', '.', '-' (it names files)")
        return v

    @field_validator("store")
    @classmethod
    def _store_reference(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_store_reference(v)
            except StoreError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_serializer("store")
    def _store_redacted(self, v: str | None) -> str | None:
        """Dumps (the config stored with the campaign, Prefect parameters) never carry a password."""
        return None if v is None else redact_url(v)

    @model_validator(mode="after")
    def _lookup_has_files(self) -> "CampaignConfig":
        if self.labeller.name == "lookup" and not self.labeller.kwargs.get("files"):
            if not any(src.file is not None for src in self.exploration.pool):
                raise ValueError("labeller 'lookup' needs kwargs.files or an exploration.pool of files to look labels up in")
        return self

    @model_validator(mode="after")
    def _password_reaches_workers(self) -> "CampaignConfig":
        """Workers on other hosts get the store as a reference they resolve themselves
        (alforge/flows/execution.py): a password written in the URL has no safe way there."""
        ex = self.execution
        remote = ex.address is not None or ex.cluster == "slurm"
        if remote and self.store is not None and redact_url(self.store) != self.store:
            where = "execution.address" if ex.address is not None else "execution.cluster: slurm"
            raise ValueError(
                f"{where}: the store URL holds a password, which Dask workers on other hosts cannot be given "
                "safely; write store: $env:NAME (NAME set for the workers too) or $secret:NAME"
            )
        return self

    @model_validator(mode="after")
    def _targets_for_target_aware(self) -> "CampaignConfig":
        from alforge.selectors import get_selector_class

        if get_selector_class(self.selector.name).needs_targets and not self.targets:
            raise ValueError(f"selector {self.selector.name!r} needs a 'targets' section (structures of interest)")
        return self

    def resolve_paths(self, base: Path) -> "CampaignConfig":
        """Make file paths absolute against ``base`` and fill the store/workdir defaults."""
        for src in [*self.seeds, *self.test, *self.targets, *self.exploration.pool]:
            if src.file is not None and not src.file.is_absolute():
                src.file = (base / src.file).resolve()
        if self.labeller.name == "lookup":  # its files, or else the pool's
            files = self.labeller.kwargs.get("files")
            files = [files] if isinstance(files, str) else files
            if files:
                self.labeller.kwargs["files"] = [str((base / f).resolve()) for f in files]
            else:
                self.labeller.kwargs["files"] = [str(s.file) for s in self.exploration.pool if s.file is not None]
        self.workdir = (base / (self.workdir or Path("runs") / self.name)).resolve()
        if self.store is None:
            self.store = f"sqlite:///{(base / f'{self.name}.db').resolve()}"
        return self


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid campaign file ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        got = err.get("input")
        if err["loc"][:1] == ("store",) and isinstance(got, str):
            got = redact_url(got)  # an error message is shown and logged: never the password
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {err['msg']}{shown}")
    return "\n".join(lines)


def _duplicate_keys(node: yaml.Node, where: str = "", seen: set[int] | None = None) -> list[str]:
    """Every key given twice in one mapping of the composed YAML, as ``field.path (lines a and b)``:
    PyYAML keeps the last one silently, so a second ``lr:`` further down a file would quietly win."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked
        return []
    seen.add(id(node))
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden on purpose
                continue
            key = str(key_node.value)
            path = f"{where}.{key}" if where else key
            line = key_node.start_mark.line + 1
            if key in lines:
                found.append(f"{path} (line {lines[key]} and line {line})")
            lines.setdefault(key, line)
            found += _duplicate_keys(value_node, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{where}.{i}" if where else str(i), seen)
    return found


def parse_config(raw: Any, path: Path, *, check_device: bool = True) -> CampaignConfig:
    """Validate ``raw`` (the file's YAML) as the campaign at ``path``; ``check_device=False`` skips
    the check that ``mlip.device`` exists here (for commands that only read the store)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of campaign settings at the top level")
    try:
        cfg = CampaignConfig.model_validate(raw, context={"check_device": check_device})
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None
    cfg.resolve_paths(path.parent)
    sources = [*cfg.seeds, *cfg.test, *cfg.targets, *cfg.exploration.pool]
    missing = [str(s.file) for s in sources if s.file is not None and not s.file.exists()]
    if cfg.labeller.name == "lookup":
        missing += [f for f in cfg.labeller.kwargs["files"] if not Path(f).exists()]
    if missing:
        raise ConfigError(f"{path}: seeds/test/targets/pool/lookup file(s) not found: {', '.join(missing)}")
    return cfg


def _section_of(annotation: Any) -> tuple[str, Any]:
    """What a field holds, for walking a dotted override key: a settings model (``model``), a list
    (``list`` of its item type), free-form settings (``free``: params, kwargs) or a plain value."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    origin = get_origin(annotation)
    if origin is list:
        return "list", (get_args(annotation) or (Any,))[0]
    if origin is dict or annotation is dict:
        return "free", None
    return "value", None


def _check_override_key(key: str) -> None:
    """Refuse a dotted key that names no setting of the campaign file, naming the part that is wrong."""
    kind, inner = "model", CampaignConfig
    parts = key.split(".")
    if not all(parts):
        raise ValueError("empty part in the dotted key")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the campaign file"
        if kind == "free":
            return
        if kind == "value":
            raise ValueError(f"{where} is a single value, it has no {part!r}")
        if kind == "list":
            if not part.isdigit():
                raise ValueError(f"{where} is a list: expected an index, got {part!r}")
            kind, inner = _section_of(inner)
            continue
        if part not in inner.model_fields:
            raise ValueError(f"{where} has no setting {part!r} (known: {', '.join(inner.model_fields)})")
        kind, inner = _section_of(inner.model_fields[part].annotation)


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """A copy of the file's settings with each dotted key (``{"selector.batch_size": 4}``) set, so a
    deployment or notebook can vary a campaign without editing its file; validation comes after."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        try:
            _check_override_key(str(key))
            *sections, leaf = str(key).split(".")
            node: Any = out
            for part in sections:
                if isinstance(node, list):
                    if int(part) >= len(node):
                        raise ValueError(f"index {part} is past the end of a list of {len(node)}")
                    node = node[int(part)]
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            if isinstance(node, list):
                if int(leaf) >= len(node):
                    raise ValueError(f"index {leaf} is past the end of a list of {len(node)}")
                node[int(leaf)] = value
            else:
                node[leaf] = value
        except ValueError as exc:
            raise ConfigError(f"{path}: override {key!r}: {exc}") from None
    return out


def load_config(
    path: str | Path, *, overrides: Mapping[str, Any] | None = None, check_device: bool = True
) -> CampaignConfig:
    """Read and validate the campaign file at ``path`` (see :func:`parse_config`), with dotted-key
    ``overrides`` applied first (:func:`apply_overrides`)."""
    path = Path(path).resolve()
    if not path.exists():
        raise ConfigError(f"{path}: campaign file not found")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        twice = _duplicate_keys(node) if node is not None else []
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if twice:
        raise ConfigError(f"{path}: key(s) given twice: {'; '.join(twice)}")
    if overrides and isinstance(raw, dict):
        raw = apply_overrides(raw, overrides, path)
    return parse_config(raw, path, check_device=check_device)
