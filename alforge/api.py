"""The Python API for notebooks: :class:`Campaign`, one campaign file and its store.

A campaign made from a dict is written as a YAML file (its structure objects as extxyz files
beside it), so it runs, resumes and deploys like any campaign file, and the CLI sees the same
thing. Results are read through the same functions as ``alforge status --json`` and ``alforge
export`` (:mod:`alforge.results`); read-only methods never create a store.

    camp = alforge.Campaign({"name": "cu", "seeds": [atoms_a, structure_b], ...}, directory="runs")
    camp.run()
    camp.iterations()[["iteration", "n_train", "test_forces_rmse"]]
    atoms.calc = camp.model()
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from ase import Atoms

from alforge.config import CampaignConfig, ConfigError, load_config
from alforge.results import ROLES, NoModelError, campaign_status, iteration_rows, selection_rows
from alforge.sources import SourceError, to_atoms, write_structures

if TYPE_CHECKING:
    import pandas as pd
    from ase.calculators.calculator import Calculator

    from alforge.storage import Store

#: campaign sections whose entries may be structure objects instead of file/generate sources
STRUCTURE_SECTIONS = ("seeds", "test", "targets")


def _plain(value: Any) -> Any:
    """``value`` as YAML can write it: paths as strings, tuples as lists, mappings as dicts."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _entry_structures(entry: Any, where: str) -> list[Atoms] | None:
    """The structures of one section entry given as objects (an Atoms, a pymatgen Structure or
    Molecule, or a list of them), or None for a source mapping (``file``/``generate``)."""
    if isinstance(entry, Mapping):
        return None
    if isinstance(entry, (list, tuple)):
        if not entry:
            raise SourceError(f"{where}: an empty list of structures")
        return [to_atoms(obj, f"{where}.{i}") for i, obj in enumerate(entry)]
    return [to_atoms(entry, where)]


def _file_sources(config: dict[str, Any], name: str) -> dict[str, list[Atoms]]:
    """Replace the structure objects among the seeds/test/targets entries of ``config`` by ``file``
    sources and return what each file must hold: all of a section's loose objects go to
    ``<name>.<section>.extxyz`` (at the place of the first), each ``{"structures": objects,
    "energy_key": ...}`` entry, whose labels are under keys of its own, to
    ``<name>.<section>-<k>.extxyz``. Every object is converted (and checked) before any is written."""
    files: dict[str, list[Atoms]] = {}
    for section in STRUCTURE_SECTIONS:
        value = config.get(section)
        if value is None:
            continue
        entries = value if isinstance(value, (list, tuple)) else [value]
        out: list[Any] = []
        loose = f"{name}.{section}.extxyz"
        for k, entry in enumerate(entries):
            where = f"{section}.{k}"
            if isinstance(entry, Mapping) and "structures" in entry:
                frames = _entry_structures(entry["structures"], f"{where}.structures")
                if frames is None:
                    raise SourceError(f"{where}.structures: expected structure objects, got a mapping")
                own = f"{name}.{section}-{k}.extxyz"
                files[own] = frames
                out.append({**{key: v for key, v in entry.items() if key != "structures"}, "file": own})
                continue
            frames = _entry_structures(entry, where)
            if frames is None:
                out.append(entry)
                continue
            if loose not in files:
                out.append({"file": loose})
            files.setdefault(loose, []).extend(frames)
        config[section] = out
    return files


class Campaign:
    """A campaign file and its store, for notebooks and scripts.

    ``Campaign(config)`` writes the dict ``config`` (the settings of a campaign file, whose
    seeds/test/targets entries may also be ASE ``Atoms``, pymatgen ``Structure``/``Molecule`` or
    lists of them) as ``<directory>/<name>.yaml``; ``Campaign.from_file(path)`` uses an existing
    file. Either way the file is validated at once (:class:`~alforge.config.ConfigError` names the
    field; :class:`~alforge.sources.SourceError` a bad structure, its field and type). As in any
    campaign file, relative paths (``file`` sources, ``workdir``) are read against its folder.
    """

    def __init__(self, config: Mapping[str, Any], *, directory: str | Path | None = None) -> None:
        if not isinstance(config, Mapping):
            raise ConfigError(f"a campaign is a mapping of settings, got {type(config).__name__}")
        name = config.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"campaign settings: name: expected a string, got {type(name).__name__}")
        try:
            CampaignConfig._slug(name)  # it names the files written below
        except ValueError as exc:
            raise ConfigError(f"campaign settings: name: {exc} (got {name!r})") from None
        folder = Path(directory if directory is not None else Path.cwd()).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        settings = dict(config)  # a copy: the caller's dict is left as it was
        files = _file_sources(settings, name)
        path = folder / f"{name}.yaml"
        try:
            text = yaml.safe_dump(_plain(settings), sort_keys=False)
        except yaml.YAMLError as exc:
            raise ConfigError(f"campaign {name!r}: a setting YAML cannot hold: {exc}") from None
        for file, frames in files.items():
            write_structures(frames, folder / file)
        path.write_text(text)
        self._init_from(path)

    @classmethod
    def from_file(cls, path: str | Path) -> "Campaign":
        """The campaign of an existing campaign file."""
        self = cls.__new__(cls)
        self._init_from(Path(path).resolve())
        return self

    def _init_from(self, path: Path) -> None:
        self.path: Path = path
        #: the validated settings (``mlip.device`` is checked when the campaign runs)
        self.config: CampaignConfig = load_config(path, check_device=False)
        self.name: str = self.config.name
        self._store: Store | None = None

    def __repr__(self) -> str:
        return f"Campaign({self.name!r}, file={str(self.path)!r})"

    # ------------------------------------------------------------------ running
    def run(
        self, wait: bool = False, accept_changes: bool = False, *, overrides: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run or resume the campaign in this process, as ``alforge run`` does: every structure is
        checked before a store exists, then :func:`alforge.flows.campaign.campaign` runs it as the
        campaign's one owner (``wait``: wait for another owner to finish; ``accept_changes``: go on
        with changed MLIP settings; ``overrides``: dotted keys over the file's settings for this run,
        ``{"stopping.max_iterations": 1}``). Returns the flow's result: ``campaign``, ``iterations``
        (their summaries), ``stop_reason`` and ``paused`` (the labelling failure budget was exceeded)."""
        from alforge.sources import check_sources

        extra = dict(overrides) if overrides else None
        cfg = load_config(self.path, overrides=extra)  # the device is checked now: this process trains
        check_sources(cfg.seeds, require_forces=True)
        check_sources([*cfg.test, *cfg.targets], require_forces=False)
        from alforge.flows.campaign import campaign

        return campaign(str(self.path), overrides=extra, wait=wait, accept_changes=accept_changes)

    # ------------------------------------------------------------------ reading
    def store(self) -> "Store":
        """The campaign's store, opened once and never created here (StoreError names a missing one)."""
        if self._store is None:
            from alforge.storage import Store

            self._store = Store(str(self.config.store), create=False)
        return self._store

    def _id(self) -> int:
        return self.store().campaign_id(self.name)  # KeyError naming the campaign before its first run

    def status(self) -> dict[str, Any]:
        """This campaign's entry of ``alforge status --json``: status, counts, failures, learning curve."""
        store = self.store()
        cid = self._id()
        (row,) = [c for c in store.campaigns() if c.id == cid]
        return campaign_status(store, row)

    def iterations(self) -> "pd.DataFrame":
        """One row per iteration: ``iteration``, ``n_train``, ``labels_done``/``labels_failed``,
        ``candidates``, ``selected``, ``stop_reason``, ``finished``, the model's metrics
        (``{train,valid,test}_{energy_rmse_per_atom,forces_rmse,...}`` in eV/atom and eV/Å) and the
        diagnostics as dotted columns (``calibration.alpha2``, ``pr_test.q50``, ...)."""
        import pandas as pd

        columns = ["iteration", "model_id", "n_train", "labels_done", "labels_failed", "candidates", "selected",
                   "stop_reason", "finished"]  # fmt: skip
        rows = iteration_rows(self.store(), self._id())
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)

    def selections(self) -> "pd.DataFrame":
        """One row per selection: ``iteration``, ``selector``, ``params``, ``candidates`` (how many
        it weighed), ``picked_ids`` (store ids, in pick order) and ``scores`` (each pick's score)."""
        import pandas as pd

        rows = selection_rows(self.store(), self._id())
        columns = ["iteration", "selector", "params", "candidates", "picked_ids", "scores"]
        return pd.DataFrame(rows, columns=columns)

    def structures(self, role: str | None = None, labelled: bool | None = None) -> list[Atoms]:
        """The campaign's structures (of ``role``: seed, candidate, test or target), with a finished
        label only (``labelled=True``), without one (``False``) or all (None), in store order.

        A label is the structure's ``SinglePointCalculator`` (``info['label_calculator']`` says
        who computed it); provenance is in ``info``: ``alforge_id`` (store id), ``role``, ``source``,
        ``iteration`` (the iteration whose MD made it) and ``parent_id`` where they apply,
        ``provenance`` (walker, step, file, ...) and ``quarantined``."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} (or None for all), got {role!r}")
        store = self.store()
        cid = self._id()
        records = store.structure_records(cid, role=role)
        done = set(store.labelled_ids(cid, role=role))
        if labelled is not None:
            records = [r for r in records if (r["id"] in done) == labelled]
        ids = [r["id"] for r in records]
        atoms_by_id = {
            int(a.info["alforge_id"]): a
            for a in [*store.get_labelled_atoms([i for i in ids if i in done]),
                      *store.get_atoms([i for i in ids if i not in done])]
        }  # fmt: skip
        out = []
        for record in records:
            atoms = atoms_by_id[record["id"]]
            atoms.info.update({k: v for k, v in record.items() if k != "id" and v is not None})
            out.append(atoms)
        return out

    def model(self, iteration: int | None = None, *, device: str = "auto") -> "Calculator":
        """An ASE calculator of the model of ``iteration`` (the latest by default), loaded by
        alforge's own weights-only loader after the store has checked the file's SHA-256."""
        from alforge.mlip.mace_model import load_calculator

        store = self.store()
        models = {m.iteration_index: m for m in store.models(self._id())}
        if not models:
            raise NoModelError(f"campaign {self.name!r} has no model yet")
        index = max(models) if iteration is None else iteration
        if index not in models:
            raise NoModelError(f"campaign {self.name!r} has no model of iteration {index}; it has {sorted(models)}")
        return load_calculator(store.model_file(models[index].id), device=device)

    def export(self, path: str | Path, *, model: str | Path | None = None, test: bool = False) -> Path:
        """Write the labelled set as extxyz to ``path`` (with ``test``, the labelled test set too)
        and, with ``model``, the latest model there in mace's format: ``alforge export``."""
        from alforge.results import export

        out = Path(path)
        export(self.store(), self.name, out, model=Path(model) if model is not None else None, test=test)
        return out
