"""The campaign's selection path at scale: ``select_batch`` on a store whose candidates hold 1e6 atoms.

A synthetic campaign is written straight through the store API (no MACE): ``--atoms`` candidate
atoms in cells of ``--atoms-per-structure`` atoms (two elements), their per-atom ``last_layer``
features (float64, d = ``--dim``, correlated rows with a decaying spectrum like real last-layer
features), a training set of ``--train`` cells with features and label rows, the model's ``loss``
Hessian ``H = ς² I + Σ_train R_sᵀR_s`` and, for ``mig_label``, every candidate's label rows.

**What the 1e6-atom case means for each selector** (all read every candidate from the store):

* ``mig``: structure rows ``f_s / n_s`` (METHODS §2), summed while 1e6 atom rows stream past;
* ``dopt``: all 1e6 atom rows (float32, one array) with their structures and elements;
* ``mig_label``: every candidate's stored label factor ``R_s``, ``min(3 n_s + 1, d)`` rows each
  (128 rows per 64-atom cell at d = 128: 2e6 rows for 1e6 atoms, stored 2 GB as float64, read
  1 GB as float32). Computing them is *not* timed: ``ensure_label_rows`` found them stored. On
  the CPU they cost ~1 min per 1,000 atoms (``bench_jacobians.py``), ~17 h for 1e6 atoms, so at
  this scale they come from a GPU run, or label-level MIG runs on a pre-screened subset.
  Their write, read and selection are measured at the full ``--atoms`` (``--label-atoms`` runs
  the selection on a smaller campaign of its own). Its lazy greedy re-scores about half the
  candidates after each pick on these homogeneous synthetic pools (an exact gain is one
  128 × 128 Cholesky, ~0.05 ms on 2 threads), so its time grows as candidates × budget.

Throughputs are also given per CPU second of this process (``rows/cpu-s``: user + system time),
which the other jobs of a shared machine disturb far less than the wall time; on a quiet machine
the wall time is that plus the waits for the disk.

Stages, each with its seconds and peak resident memory (RSS sampled every 5 ms by a thread; the
``+MB`` column is the peak above the RSS when the stage began):

* ``write``: structures (setup, not a goal: one Core insert, see :func:`_add_cells`), then feature
  blobs through ``Store.put_features`` (rows/s: atom rows; label rows);
* ``read``: the store read ``select_batch`` makes, chunked into one preallocated float32 array,
  side by side with the old path (``get_features`` list of float64 arrays + ``np.concatenate``);
* ``whiten``: ``H.variance`` of what the selector scores (the one O(N d²) pass; not for dopt);
* ``select``: the selector's ``select`` on those inputs;
* ``write-selection``: ``add_selection`` + ``request_labels``;
* ``select_batch``: the whole step end to end in a fresh process (its own peak RSS: ``VmHWM``),
  imports included; with features and H stored it imports neither torch nor MACE (recorded).

Each selector runs in a fresh child process, so one's peak does not hide another's.

Measured on this 2-core machine (2026-12-03, load 0.5 at the start), 1e6 atoms, SQLite,
``--selectors mig,mig_label,dopt``: write 125k atom rows/s and 134k label rows/s; the chunked
float32 read 299k rows/s, +492 MB (old list + concatenate: +1.9 GB); select_batch ``mig`` 1.46 s,
peak 259 MB; ``mig_label`` 53.4 s, peak 3151 MB (select 47.0 s; 50.5 s in a run of it alone);
``dopt`` 24.9 s, peak 1852 MB. On PostgreSQL 15 (fsync on, its server on the same 2 cores, load
1.6–1.9): write 90k atom rows/s, 112k label rows/s; select_batch ``mig`` 2.95 s, ``mig_label``
59.1 s (its read of 2e6 label rows 9.3 s), ``dopt`` 29.6 s, peaks as on SQLite. ``dopt`` is not in
the default run (the build of its pool adds
minutes); add it with ``--selectors mig,mig_label,dopt``.

    .venv/bin/python benchmarks/bench_select_path.py            # 1e6 atoms, mig + mig_label (~4 minutes)
    .venv/bin/python benchmarks/bench_select_path.py --quick    # 1e5 atoms
    .venv/bin/python benchmarks/bench_select_path.py --backend postgresql --url postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_report, table  # noqa: E402

from alforge.storage import Store  # noqa: E402

ELEMENTS = (29, 47)  # Cu, Ag
SELECTORS = ("mig", "mig_label", "dopt")
#: The labeller identity recorded with the label requests (no labeller runs here).
CALCULATOR, PARAMS_HASH = "emt", "bench"


@dataclass(frozen=True)
class Campaign:
    """Ids of a synthetic campaign: the candidate pool is shared by every selection iteration."""

    url: str
    campaign_id: int
    model_id: int
    candidate_ids: list[int]
    train_ids: list[int]
    dim: int


def _features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Correlated Gaussian rows with a decaying spectrum (like real last-layer features)."""
    return rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1))


def _cells(rng: np.random.Generator, count: int, n_atoms: int) -> list:
    """Random two-element cells (distinct, so the store's dedup keeps every one)."""
    from ase import Atoms

    side = (n_atoms * 12.0) ** (1 / 3)
    return [
        Atoms(
            numbers=rng.choice(ELEMENTS, n_atoms),
            positions=rng.uniform(0, side, (n_atoms, 3)),
            cell=[side] * 3,
            pbc=True,
        )
        for _ in range(count)
    ]


def _add_cells(store: Store, campaign_id: int, cells: list, role: str, source: str) -> list[int]:
    """Insert distinct new cells with one Core executemany, ids in order: ``Store.add_structures``
    deduplicates and flushes one ORM row at a time (~6 ms a cell here), which would make the setup
    of 15,625 cells the slowest part of this benchmark. The columns are the store's own encoding."""
    from sqlalchemy import insert, select

    from alforge.storage import models
    from alforge.storage.atoms_codec import atoms_to_columns, canonical_hash

    rows = [
        {"campaign_id": campaign_id, "role": role, "source": source, "quarantined": False,
         "hash": canonical_hash(a), **atoms_to_columns(a)}
        for a in cells
    ]
    hashes = [r["hash"] for r in rows]
    with store.engine.begin() as conn:
        conn.execute(insert(models.Structure), rows)
        ids = dict(conn.execute(
            select(models.Structure.hash, models.Structure.id).where(
                models.Structure.campaign_id == campaign_id, models.Structure.hash.in_(hashes)
            )
        ).all())
    return [ids[h] for h in hashes]


def _label_factor(rng: np.random.Generator, n_atoms: int, d: int) -> np.ndarray:
    """A stand-in ``R_s``: ``min(3n + 1, d)`` rows, as :func:`alforge.mlip.jacobians.label_rows` gives."""
    return 0.3 * _features(rng, min(3 * n_atoms + 1, d), d)


def build_campaign(
    url: str,
    n_atoms: int,
    atoms_per_structure: int = 64,
    dim: int = 128,
    n_train: int = 40,
    label_rows: bool = True,
    seed: int = 0,
    chunk: int = 256,
    timings: dict[str, float] | None = None,
    name: str = "bench-select-path",
) -> Campaign:
    """Write the synthetic campaign into the store at ``url`` (module docstring); ``timings`` gets
    the seconds of each write phase (``structures``, ``features``, ``label_rows``)."""
    from alforge.mlip.loss_weights import LossWeights
    from alforge.tasks.featurize import LABEL_ROWS, LAST_LAYER
    from alforge.uncertainty.rigidity import data_matrix

    timings = {} if timings is None else timings
    rng = np.random.default_rng(seed)
    store = Store(url)
    cid = store.get_or_create_campaign(name, {"bench": True})
    it = store.get_or_create_iteration(cid, 0)
    n_cand = max(1, n_atoms // atoms_per_structure)
    start = time.perf_counter()
    train_ids = _add_cells(store, cid, _cells(rng, n_train, atoms_per_structure), "seed", "seed")
    cand_ids: list[int] = []
    for first in range(0, n_cand, 500):
        cells = _cells(rng, min(500, n_cand - first), atoms_per_structure)
        cand_ids += _add_cells(store, cid, cells, "candidate", "pool")
    timings["structures"] = time.perf_counter() - start
    model_id = store.add_model(cid, it, "/nonexistent/bench.model", train_ids, {})

    weights = LossWeights(energy=1.0, forces=10.0)
    train_blocks = []
    timings.update(features=0.0, features_cpu=0.0, label_rows=0.0, label_rows_cpu=0.0)
    for ids, is_train in ((train_ids, True), (cand_ids, False)):
        for first in range(0, len(ids), chunk):
            part = ids[first : first + chunk]
            feats = {i: _features(rng, atoms_per_structure, dim) for i in part}
            t0, c0 = time.perf_counter(), time.process_time()
            store.put_features(model_id, {LAST_LAYER: (feats, "<f8")})
            timings["features"] += time.perf_counter() - t0
            timings["features_cpu"] += time.process_time() - c0
            if label_rows or is_train:
                blocks = {i: _label_factor(rng, atoms_per_structure, dim) for i in part}
                if is_train:
                    train_blocks += list(blocks.values())
                t0, c0 = time.perf_counter(), time.process_time()
                store.put_features(model_id, {LABEL_ROWS: (blocks, "<f8")})
                timings["label_rows"] += time.perf_counter() - t0
                timings["label_rows_cpu"] += time.process_time() - c0
    regularizer = 1e-3
    matrix = data_matrix(train_blocks, dim)
    matrix[np.diag_indices(dim)] += regularizer**2
    store.put_hessian(model_id, "loss", matrix, regularizer, "given", weights.to_dict(), n_train)
    store.close()
    return Campaign(url, cid, model_id, cand_ids, train_ids, dim)


class PeakRSS:
    """The process's resident set size, sampled every ``interval`` s by a daemon thread; :meth:`stage`
    measures one stage's peak."""

    def __init__(self, interval: float = 0.005) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._peak = self.now()
        self._interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while True:
            self._peak = max(self._peak, self.now())
            time.sleep(self._interval)

    @contextmanager
    def stage(self, record: dict[str, Any]) -> Iterator[None]:
        """Fill ``record`` with ``s``, ``peak_mb`` and ``extra_mb`` (the peak above the starting RSS)."""
        base = self._peak = self.now()
        start = time.perf_counter()
        yield
        record["s"] = time.perf_counter() - start
        peak = max(self._peak, self.now())
        record["peak_mb"], record["extra_mb"] = peak / 2**20, (peak - base) / 2**20


def _inputs(name: str, campaign: Campaign, hessian: Any) -> tuple[Any, dict[str, Any], Any]:
    """``(candidates, context, train)`` exactly as ``select_batch`` assembles them for ``name``."""
    from alforge.tasks import select as sel
    from alforge.tasks.featurize import atom_features

    url, mid, cands = campaign.url, campaign.model_id, campaign.candidate_ids
    if name == "dopt":
        store = Store(url)
        rows, groups = atom_features(url, mid, cands, sel.row_dtype(name))
        train, _ = atom_features(url, mid, campaign.train_ids, sel.row_dtype(name))
        context = {
            "groups": groups,
            "elements": sel._numbers(store, cands),
            "train_elements": sel._numbers(store, campaign.train_ids),
        }
        return rows, context, train
    context = {"hessian": hessian}
    if name == "mig_label":
        context["label_rows"] = sel._label_blocks(url, mid, cands, hessian, sel.row_dtype(name))
    return sel.energy_rows(url, mid, cands, sel.row_dtype(name)), context, None


def _reference_read(name: str, campaign: Campaign) -> None:
    """The old read: a list of per-structure float64 arrays, then one concatenated copy."""
    from alforge.tasks.featurize import LABEL_ROWS, LAST_LAYER

    store = Store(campaign.url)
    kind = LABEL_ROWS if name == "mig_label" else LAST_LAYER
    per_structure = store.get_features(campaign.model_id, kind, campaign.candidate_ids)
    if name == "mig":
        np.stack([f.sum(axis=0) / len(f) for f in per_structure])
    else:
        np.concatenate(per_structure)


def _high_water_mb() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` is no use in a child: it keeps the parent's
    peak across ``exec``)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(name: str, campaign: Campaign, budget: int) -> dict[str, Any]:
    """One selector's stages in this (fresh) process; returns the records."""
    from alforge.config import SelectorConfig, UncertaintyConfig
    from alforge.selectors import make_selector
    from alforge.tasks.hessian import ensure_hessian
    from alforge.tasks.select import _configured, select_batch

    store = Store(campaign.url)
    cfg, unc = SelectorConfig(name=name, batch_size=budget), UncertaintyConfig()
    out: dict[str, Any] = {}
    # end to end first, so the high-water mark is select_batch's own peak (imports included)
    it = store.get_or_create_iteration(campaign.campaign_id, 1 + SELECTORS.index(name))
    start = time.perf_counter()
    result = select_batch.fn(campaign.url, campaign.campaign_id, it, campaign.model_id, cfg, CALCULATOR, PARAMS_HASH, unc)
    out["select_batch"] = {
        "s": time.perf_counter() - start,
        "peak_mb": _high_water_mb(),
        "picked": result["picked"],
        "n_candidates": result["n_candidates"],
        # with every feature and H stored, selecting needs neither torch nor MACE (seconds to import)
        "imported_torch": "torch" in sys.modules,
    }
    rss = PeakRSS()
    hessian = ensure_hessian(campaign.url, campaign.model_id) if make_selector(name).uses_hessian else None
    selector = _configured(cfg, 0, 0, hessian)
    out["read"] = {}
    with rss.stage(out["read"]):
        candidates, context, train = _inputs(name, campaign, hessian)
    out["read (old: list + concatenate, float64)"] = {}
    with rss.stage(out["read (old: list + concatenate, float64)"]):
        _reference_read(name, campaign)
    if hessian is not None:
        out["whiten"] = {}
        with rss.stage(out["whiten"]):
            if name == "mig_label":
                hessian.variance(context["label_rows"][0].base if context["label_rows"] else candidates)
            else:
                hessian.variance(candidates)
    out["select"] = {}
    with rss.stage(out["select"]):
        picked = selector.select(candidates, budget, train=train, **context)
    ids = [campaign.candidate_ids[int(i)] for i in picked.indices]
    out["select"]["same_picks_as_select_batch"] = ids == result["picked"]
    out["write-selection"] = {}
    with rss.stage(out["write-selection"]):
        it2 = store.get_or_create_iteration(campaign.campaign_id, 10 + SELECTORS.index(name))
        store.add_selection(it2, campaign.model_id, name, selector.get_params(), campaign.candidate_ids, ids,
                            picked.scores, picked.info)
        store.request_labels(ids, CALCULATOR, PARAMS_HASH)
    return out


def _run_child(name: str, campaign: Campaign, budget: int) -> dict[str, Any]:
    """:func:`child` in a fresh interpreter (its peak RSS is its own)."""
    spec = json.dumps({**campaign.__dict__, "selector": name, "budget": budget})
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read_throughput(campaign: Campaign, rss: PeakRSS, with_label_rows: bool) -> list[list[Any]]:
    """Rows/s of the chunked read (float32 and float64 out) against the old list read, and of the
    candidates' label rows."""
    from alforge.tasks.featurize import LABEL_ROWS, LAST_LAYER

    store = Store(campaign.url)
    rows: list[list[Any]] = []
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("get_feature_rows → float32", lambda: store.get_feature_rows(campaign.model_id, LAST_LAYER, campaign.candidate_ids)),
        ("get_feature_rows → float64", lambda: store.get_feature_rows(campaign.model_id, LAST_LAYER, campaign.candidate_ids, "<f8")),
        ("get_features list + concatenate (old)", lambda: np.concatenate(store.get_features(campaign.model_id, LAST_LAYER, campaign.candidate_ids))),
    ]
    if with_label_rows:
        cases.append(("label rows R_s: get_feature_rows → float32", lambda: store.get_feature_rows(
            campaign.model_id, LABEL_ROWS, campaign.candidate_ids)))
    for label, fn in cases:
        record: dict[str, Any] = {}
        cpu = time.process_time()
        with rss.stage(record):
            n = len(fn().rows if "get_feature_rows" in label else fn())
        cpu = time.process_time() - cpu
        rows.append([label, n, record["s"], n / record["s"], n / cpu, record["peak_mb"], record["extra_mb"]])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atoms", type=float, default=1e6, help="candidate atoms (default 1e6)")
    parser.add_argument("--quick", action="store_true", help="1e5 atoms")
    parser.add_argument("--atoms-per-structure", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--train", type=int, default=40, help="training cells")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument(
        "--label-atoms", type=float,
        help="candidate atoms of a smaller campaign of mig_label's own (default: --atoms; module docstring)",
    )
    parser.add_argument(
        "--selectors", default="mig,mig_label",
        help=f"any of {','.join(SELECTORS)}; dopt is opt-in (module docstring)",
    )
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--url", help="an empty PostgreSQL database for --backend postgresql")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        name, budget = spec.pop("selector"), spec.pop("budget")
        print(json.dumps(child(name, Campaign(**spec), budget), default=float))
        return
    n_atoms = int(1e5 if args.quick else args.atoms)
    label_atoms = n_atoms if args.label_atoms is None else int(min(args.label_atoms, n_atoms))
    selectors = [s for s in args.selectors.split(",") if s]
    unknown = set(selectors) - set(SELECTORS)
    if unknown:
        parser.error(f"--selectors: unknown {sorted(unknown)}; choose from {SELECTORS}")
    if args.backend == "postgresql" and not args.url:
        parser.error("--backend postgresql needs --url (an empty database)")
    print(machine_report())
    with tempfile.TemporaryDirectory(prefix="bench-select-path-") as tmp:
        url = args.url if args.backend == "postgresql" else f"sqlite:///{Path(tmp) / 'store.db'}"
        rss = PeakRSS()
        timings: dict[str, float] = {}
        write: dict[str, Any] = {}
        with rss.stage(write):
            campaign = build_campaign(
                url, n_atoms, args.atoms_per_structure, args.dim, args.train, "mig_label" in selectors,
                timings=timings,
            )
        n_cand = len(campaign.candidate_ids)
        feat_rows = (n_cand + args.train) * args.atoms_per_structure
        label_rows = (n_cand if "mig_label" in selectors else 0) + args.train
        label_rows *= min(3 * args.atoms_per_structure + 1, args.dim)
        print(
            f"\n{args.backend} store: {n_cand} candidate cells × {args.atoms_per_structure} atoms = "
            f"{n_cand * args.atoms_per_structure} candidate atoms, d={args.dim}, {args.train} training cells, "
            f"budget {args.budget}"
        )
        print("\nwrite (through Store.put_features, 256 structures per call; peak RSS of the whole build "
              f"{write['peak_mb']:.0f} MB)")
        print(table(
            ["what", "rows", "s", "rows/s", "rows/cpu-s"],
            [
                ["structures (Core bulk insert; setup)", n_cand + args.train, timings["structures"],
                 (n_cand + args.train) / timings["structures"], "-"],
                ["last_layer atom rows (float64 blobs)", feat_rows, timings["features"],
                 feat_rows / timings["features"], feat_rows / timings["features_cpu"]],
                ["label rows R_s (float64 blobs)", label_rows, timings["label_rows"],
                 label_rows / timings["label_rows"], label_rows / timings["label_rows_cpu"]],
            ],
        ))
        print("\nread of every candidate's rows (one query per 900 cells)")
        print(table(["how", "rows", "s", "rows/s", "rows/cpu-s", "peak MB", "+MB"], _read_throughput(campaign, rss, "mig_label" in selectors)))
        if "mig_label" in selectors:
            label_campaign = campaign if label_atoms == n_atoms else build_campaign(
                url, label_atoms, args.atoms_per_structure, args.dim, args.train, True, seed=1, name="label"
            )
            if label_campaign is not campaign:
                print(f"\nmig_label selects from its own campaign: {len(label_campaign.candidate_ids)} cells, "
                      f"{len(label_campaign.candidate_ids) * args.atoms_per_structure} atoms (--label-atoms)")
        print("\nselection stages (each selector in a fresh process; goal: select_batch < 60 s, < 4096 MB)", flush=True)
        headers = ["selector", "stage", "s", "peak MB", "+MB", "note"]
        for name in selectors:
            records = _run_child(name, label_campaign if name == "mig_label" else campaign, args.budget)
            stage_rows = []
            for stage, rec in records.items():
                note = ""
                if stage == "select_batch":
                    torch_note = "torch imported" if rec["imported_torch"] else "no torch import"
                    note = f"{rec['n_candidates']} candidates, peak = VmHWM, {torch_note}"
                elif "same_picks_as_select_batch" in rec:
                    note = "same picks as select_batch" if rec["same_picks_as_select_batch"] else "PICKS DIFFER"
                stage_rows.append([name, stage, rec["s"], rec["peak_mb"], rec.get("extra_mb", "-"), note])
            print(table(headers, stage_rows), flush=True)
        print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
