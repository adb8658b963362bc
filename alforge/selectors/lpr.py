"""``lpr``: the least rigid local environments of large structures, to carve and label (METHODS §5).

A cell of thousands of atoms cannot be labelled, but the atoms whose energy contributions the model
knows least can: per-atom local prediction rigidity ``R_j = (f_jᵀH⁻¹f_j)⁻¹`` under the model's loss
Hessian ``H`` (METHODS §2) ranks them, and the lowest become *centres* whose environments
:func:`alforge.embedding.embed` turns into small labellable structures (cluster, periodic or
high-symmetry embedding; the campaign's select step does that, :mod:`alforge.tasks.carve`).

**Deduplication in whitened feature space.** The ``k`` lowest atoms of a cell are typically ten
neighbours of one defect, or the same defect in successive MD frames: one environment, one pick.
Two rows ``i, j`` count as the same environment when their correlation under ``H⁻¹``,

    ρ²_ij = (f_iᵀH⁻¹f_j)² / (f_iᵀH⁻¹f_i · f_jᵀH⁻¹f_j),

is at least ``overlap``. This is a distance in feature space chosen over a real-space radius
because (1) it is what matters: a label that pins ``f_i`` down removes the fraction ``ρ²_ij`` of
``j``'s variance (in the limit of a heavily weighted row), so at the default ``overlap = 0.5`` a
skipped atom would have had its LPR at least doubled by the pick; (2) it sees repeats that real
space cannot — the same defect in another frame or another structure, symmetry-equivalent sites —
and it does not merge two different environments that merely sit close; (3) it is scale-free and
needs nothing beyond the whitened rows ``L⁻¹f`` the LPR is computed from (one ``O(n d)`` product per
pick).

**Whole structures.** A candidate with at most ``max_atoms`` atoms is labellable as it is: it is
picked whole, ranked by its lowest atom LPR, exactly like a structure-level pick (its other atoms
are then skipped). Larger candidates contribute centres ``(structure, atom)``.

**Budget.** A whole pick costs one label, a centre ``copies`` labels (plus one, once, for the
pristine host of ``high_symmetry``); picks stop at ``k`` or when the next would exceed the budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_features, check_hessian

#: Embedding strategies of :func:`alforge.embedding.embed`.
STRATEGIES = ("cluster", "periodic", "high_symmetry")


@register
class LocalRigiditySelector(Selector):
    """Lowest per-atom LPR under the model's ``H``, one pick per distinct environment (module docstring).

    ``select(candidates, budget, hessian=H, groups=...)``: ``candidates`` are per-atom last-layer
    rows, ``groups`` each row's structure (its atoms in order, so a row's atom index is its rank
    among its structure's rows). ``Selection.indices`` are structures (a large one may appear once
    per centre), ``scores`` the pick's LPR (ascending), and ``info["centres"]`` lists
    ``{"pick": k, "atom": a}`` for each pick ``k`` that is a centre to carve at atom ``a`` of
    structure ``indices[k]``; the other picks are whole structures.

    The embedding parameters (``strategy``, ``cutoff`` — default: the model's ``r_max`` —,
    ``buffer`` — default: the embedding's —, ``copies``, ``rattle``, ``contact`` — default: 0.85 of
    the chemistry's shortest covalent bond, :func:`alforge.embedding.checks.bond_contact` —, ``seed``, ``host``:
    a structure file for ``high_symmetry``) are recorded with the selection and used by the select
    step to carve; the selection itself reads only ``k``, ``max_atoms``, ``overlap``, ``copies`` and
    ``strategy`` (for the budget).
    """

    name = "lpr"
    level = "atom"
    uses_hessian = True
    #: the select step embeds this selector's centres and labels what it generates (tasks/carve.py)
    carves = True

    def __init__(
        self,
        k: int | None = None,
        max_atoms: int = 64,
        overlap: float = 0.5,
        strategy: str = "periodic",
        cutoff: float | None = None,
        buffer: float | None = None,
        copies: int = 1,
        rattle: float = 0.2,
        contact: float | None = None,
        seed: int = 0,
        host: str | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"lpr: strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
        if k is not None and k < 1:
            raise ValueError(f"lpr: k must be >= 1 (or null: as many as the budget allows), got {k}")
        if max_atoms < 1:
            raise ValueError(f"lpr: max_atoms must be >= 1, got {max_atoms}")
        if not 0 < overlap <= 1:
            raise ValueError(f"lpr: overlap must be in (0, 1], got {overlap}")
        if copies < 1:
            raise ValueError(f"lpr: copies must be >= 1, got {copies}")
        if cutoff is not None and not cutoff > 0:
            raise ValueError(f"lpr: cutoff must be > 0 Å (or null: the model's r_max), got {cutoff}")
        if buffer is not None and not buffer >= 0:
            raise ValueError(f"lpr: buffer must be >= 0 Å (or null: the embedding's default), got {buffer}")
        if rattle < 0 or (contact is not None and not contact > 0):
            raise ValueError(f"lpr: rattle must be >= 0 and contact > 0 Å (or null), got {rattle} and {contact}")
        if host is not None and strategy != "high_symmetry":
            raise ValueError("lpr: host is a high_symmetry setting; strategy is " + repr(strategy))
        self.k = k
        self.max_atoms = max_atoms
        self.overlap = overlap
        self.strategy = strategy
        self.cutoff = cutoff
        self.buffer = buffer
        self.copies = copies
        self.rattle = rattle
        self.contact = contact
        self.seed = seed
        self.host = host

    def informative(self, scores: np.ndarray, min_score: float | None) -> int:
        """In LPR units, lower is more informative: with ``min_score > 0`` a pick counts if its LPR
        ``≤ min_score`` (fewer than ``min_score`` effective training points along the atom's row);
        unset (``None`` or ``≤ 0``), every pick counts — the least rigid environments are always
        worth carving until another stopping rule ends the campaign."""
        scores = np.asarray(scores, dtype=np.float64)
        if min_score is None or min_score <= 0:
            return int(scores.size)
        return int(np.count_nonzero(scores <= min_score))

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        candidates = check_features("candidates", candidates)
        hessian = check_hessian(context.get("hessian"), candidates.shape[1])
        if hessian is None:
            raise ValueError("lpr needs hessian= (the model's loss Hessian)")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if context.get("groups") is None:
            raise ValueError("lpr needs groups= (each row's structure)")
        groups = np.asarray(context["groups"])
        if groups.shape != (len(candidates),):
            raise ValueError(f"groups must have shape ({len(candidates)},), got {groups.shape}")
        structures, owner, sizes = np.unique(groups, return_inverse=True, return_counts=True)
        # a row's atom index: its rank among its structure's rows
        by_owner = np.argsort(owner, kind="stable")
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        atom_index = np.empty(len(candidates), dtype=np.int64)
        atom_index[by_owner] = np.arange(len(candidates)) - first[owner[by_owner]]

        z = hessian.whiten(candidates)
        variance = np.einsum("ij,ij->i", z, z)
        with np.errstate(divide="ignore"):
            lpr = 1.0 / variance  # a zero row is infinitely rigid: ranked last
        covered = np.zeros(len(candidates), dtype=bool)
        limit = self.k if self.k is not None else budget
        picks: list[int] = []
        scores: list[float] = []
        centres: list[dict[str, int]] = []
        spent = 0
        for row in np.argsort(lpr, kind="stable"):
            if len(picks) >= limit or spent >= budget:
                break
            if covered[row]:
                continue
            s = owner[row]
            whole = sizes[s] <= self.max_atoms
            cost = 1 if whole else self.copies + int(self.strategy == "high_symmetry" and not centres)
            if spent + cost > budget:
                continue  # a cheaper (whole) pick may still fit
            if not whole:
                centres.append({"pick": len(picks), "atom": int(atom_index[row])})
            picks.append(int(s))
            scores.append(float(lpr[row]))
            spent += cost
            # the same environment: ρ² ≥ overlap with this pick (the row itself has ρ² = 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rho2 = (z @ z[row]) ** 2 / (variance * variance[row])
            covered |= rho2 >= self.overlap
            if whole:
                covered[owner == s] = True
        return Selection(
            structures[np.asarray(picks, dtype=np.int64)],
            np.asarray(scores),
            info={"centres": centres, "whole": len(picks) - len(centres), "labels_planned": spent},
        )
