"""The ``lookup`` labeller: labels that already exist, read from files instead of computed.

For benchmarks and retrospective campaigns on a labelled dataset: the pool is a labelled file, the
campaign sees it unlabelled, and "labelling" a picked structure returns the label the file holds.

Matching is by the canonical structure hash (:mod:`alforge.structure_hash`, the store's dedup key),
not by the (file, frame) recorded at ingest, because a labeller only ever sees an ``Atoms``: the hash
needs no store access, no provenance, and survives re-ordered or re-chunked files, duplicates across
files, and structures that arrived by another route (seeds, ``alforge import``). The store
round-trips positions exactly, so a structure read back from the store hashes as it did in the file.
A structure in none of the files (an MD frame, say) fails with :attr:`FailureClass.NO_LABEL`, which
is never retried and quarantines the structure (it never will have a label).

Memory: each file is read once per process with ``ase.io.iread`` (frame by frame) into a compact
table — 32-byte hash → row, energies, one concatenated float64 force array with per-frame offsets,
and stresses — so a 1e5-frame pool is never held as ``Atoms`` objects; the table is shared by every
labeller instance in the process (one is built per labelling attempt) and by concurrent label jobs.

Kwargs: ``files`` (paths; the campaign fills in its ``exploration.pool`` files when none are given),
``energy_key``/``forces_key``/``stress_key`` (default ASE's ``energy``/``forces``/``stress``, found in
``atoms.calc.results``, ``atoms.info`` or ``atoms.arrays``, e.g. ``forces_key: force``), ``format``
(``ase.io`` format, default from the file name) and ``max_force`` (see :func:`check_label`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase
import ase.io
import numpy as np
from ase import Atoms

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

_CHUNK = 2000  # frames between consolidations of the growing arrays


def _value(atoms: Atoms, key: str, per_atom: bool) -> Any:
    results = atoms.calc.results if atoms.calc is not None else {}
    if key in results:
        return results[key]
    return (atoms.arrays if per_atom else atoms.info).get(key)


def _stress9(value: Any) -> np.ndarray | None:
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.size == 9:
        return arr
    if arr.size == 6:  # Voigt xx yy zz yz xz xy (ASE order)
        xx, yy, zz, yz, xz, xy = arr
        return np.array([xx, xy, xz, xy, yy, yz, xz, yz, zz])
    return None


@dataclass
class _Table:
    """Labels of every frame of some files, compactly: row r has energy[r], forces[off[r]:off[r+1]]
    (empty if the frame had none), stress[r] (NaN if none), and came from frame[r] of file[r]."""

    rows: dict[bytes, int]
    energy: np.ndarray
    offsets: np.ndarray
    forces: np.ndarray
    has_forces: np.ndarray
    stress: np.ndarray
    file: np.ndarray
    frame: np.ndarray
    paths: list[str]
    duplicates: int


def _build_table(paths: list[str], fmt: str | None, keys: tuple[str, str, str]) -> _Table:
    energy_key, forces_key, stress_key = keys
    rows: dict[bytes, int] = {}
    energy: list[float] = []
    counts: list[int] = []
    has_forces: list[bool] = []
    stress: list[np.ndarray] = []
    file_of: list[int] = []
    frame_of: list[int] = []
    force_chunks: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    duplicates = 0
    nan9 = np.full(9, np.nan)
    for fi, path in enumerate(paths):
        for k, atoms in enumerate(ase.io.iread(path, index=":", format=fmt)):
            h = bytes.fromhex(canonical_hash(atoms))
            if h in rows:
                duplicates += 1
                continue
            rows[h] = len(energy)
            e = _value(atoms, energy_key, per_atom=False)
            energy.append(float(e) if e is not None else np.nan)
            f = _value(atoms, forces_key, per_atom=True)
            f = np.asarray(f, dtype=float) if f is not None else None
            ok = f is not None and f.shape == (len(atoms), 3)
            has_forces.append(ok)
            counts.append(len(atoms) if ok else 0)
            if ok:
                pending.append(f)
            s = _value(atoms, stress_key, per_atom=False)
            s9 = _stress9(s) if s is not None else None
            stress.append(s9 if s9 is not None else nan9)
            file_of.append(fi)
            frame_of.append(k)
            if len(pending) >= _CHUNK:
                force_chunks.append(np.concatenate(pending))
                pending = []
    if pending:
        force_chunks.append(np.concatenate(pending))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return _Table(
        rows=rows,
        energy=np.asarray(energy, dtype=float),
        offsets=offsets,
        forces=np.concatenate(force_chunks) if force_chunks else np.empty((0, 3)),
        has_forces=np.asarray(has_forces, dtype=bool),
        stress=np.asarray(stress, dtype=float).reshape(-1, 9),
        file=np.asarray(file_of, dtype=np.int32),
        frame=np.asarray(frame_of, dtype=np.int64),
        paths=list(paths),
        duplicates=duplicates,
    )


_TABLES: dict[tuple, _Table] = {}
_LOCK = threading.Lock()


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def label_table(paths: list[str], fmt: str | None, keys: tuple[str, str, str]) -> _Table:
    """The (process-wide cached) label table of ``paths``; rebuilt if a file changed."""
    key = (tuple(_file_key(p) for p in paths), fmt, keys)
    with _LOCK:
        table = _TABLES.get(key)
        if table is None:
            # one table per file set: drop stale versions of the same files
            for old in [k for k in _TABLES if [f[0] for f in k[0]] == [f[0] for f in key[0]]]:
                del _TABLES[old]
            table = _TABLES[key] = _build_table(list(paths), fmt, keys)
        return table


class LookupLabeller(Labeller):
    """Returns the label a file holds for the structure (matched by canonical hash)."""

    name = "lookup"

    def __init__(
        self,
        files: list[str] | str | None = None,
        energy_key: str = "energy",
        forces_key: str = "forces",
        stress_key: str = "stress",
        format: str | None = None,
        max_force: float | None = None,
    ) -> None:
        if files is None:
            files = []
        elif isinstance(files, (str, os.PathLike)):
            files = [files]
        if not isinstance(files, (list, tuple)) or not all(isinstance(f, (str, os.PathLike)) for f in files):
            raise ValueError(f"lookup: 'files' must be a list of paths, got {files!r}")
        for key_name, key in (("energy_key", energy_key), ("forces_key", forces_key), ("stress_key", stress_key)):
            if not isinstance(key, str) or not key:
                raise ValueError(f"lookup: {key_name} must be a non-empty string, got {key!r}")
        self.files = [str(f) for f in files]
        self.keys = (energy_key, forces_key, stress_key)
        self.format = format
        self.max_force = max_force

    def provenance(self) -> dict[str, Any]:
        # name and size, not the absolute path: moving a campaign folder keeps its labels' identity
        ident = [(Path(f).name, os.path.getsize(f) if os.path.exists(f) else None) for f in self.files]
        return {
            "code": self.name,
            "version": f"ase {ase.__version__}",
            "params_hash": params_hash({"files": ident, "keys": list(self.keys), "format": self.format}),
        }

    def label(self, atoms: Atoms) -> Label:
        start = time.perf_counter()
        try:
            if not self.files:
                raise LabelFailure(FailureClass.NO_LABEL, "lookup: no files to look labels up in")
            try:
                table = label_table(self.files, self.format, self.keys)
            except (OSError, ValueError) as exc:  # unreadable file: a set-up error, not this structure's
                raise LabelFailure(FailureClass.CRASH, f"lookup: cannot read {self.files}: {exc}") from exc
            h = canonical_hash(atoms)
            row = table.rows.get(bytes.fromhex(h))
            if row is None:
                raise LabelFailure(
                    FailureClass.NO_LABEL,
                    f"lookup: {atoms.get_chemical_formula()} (hash {h[:12]}) is in none of "
                    f"{', '.join(Path(p).name for p in table.paths)}",
                )
            where = {"file": table.paths[table.file[row]], "frame": int(table.frame[row])}
            name = f"frame {where['frame']} of {Path(where['file']).name}"
            energy_key, forces_key, stress_key = self.keys
            if not np.isfinite(table.energy[row]):
                raise LabelFailure(FailureClass.NO_LABEL, f"lookup: {name} has no energy under {energy_key!r}",
                                   metadata=where)
            if not table.has_forces[row]:
                raise LabelFailure(FailureClass.NO_LABEL, f"lookup: {name} has no forces under {forces_key!r}",
                                   metadata=where)
            forces = table.forces[table.offsets[row] : table.offsets[row + 1]].copy()
            s = table.stress[row]
            stress = s.reshape(3, 3).copy() if np.all(np.isfinite(s)) else None
            meta = {**provenance_metadata(self.provenance(), time.perf_counter() - start), **where}
            return check_label(Label(float(table.energy[row]), forces, stress, meta), len(atoms), self.max_force)
        except LabelFailure as failure:
            failure.metadata = {**provenance_metadata(self.provenance(), time.perf_counter() - start),
                                **failure.metadata}
            raise
