"""Farthest-point sampling on structure features: the diversity baseline (METHODS §9).

Each pick is the candidate farthest (Euclidean) from everything already covered — the training
set and earlier picks — so the score is that distance at the moment of picking. Seeding from the
training set makes FPS skip regions the model already has; with no training set the first pick is
the candidate farthest from the candidates' centroid (scored by that distance).

Cost: nearest-training distances by chunked GEMM (``|x|² + |y|² − 2x·y``, O(N N_train d), ~32 MB
blocks), then O(N d) per pick with exact differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alforge.selectors import register
from alforge.selectors.base import Selection, Selector, check_budget, check_features
from alforge.uncertainty.rigidity import chunk_rows, iter_chunks


def nearest_squared_distance(points: np.ndarray, references: np.ndarray) -> np.ndarray:
    """``min_r |p − r|²`` for each row of ``points``, in blocks of ~32 MB."""
    out = np.full(len(points), np.inf)
    ref_sq = np.einsum("ij,ij->i", references, references)
    point_step = min(chunk_rows(points.shape[1]), 4096)
    ref_step = max(1, chunk_rows(1) // point_step)  # (point_step × ref_step) block ≈ 32 MB
    for p0 in range(0, len(points), point_step):
        block = np.asarray(points[p0 : p0 + point_step], dtype=np.float64)
        block_sq = np.einsum("ij,ij->i", block, block)
        best = out[p0 : p0 + point_step]
        for r0 in range(0, len(references), ref_step):
            ref = references[r0 : r0 + ref_step]
            sq = block_sq[:, None] + ref_sq[None, r0 : r0 + ref_step] - 2.0 * (block @ ref.T)
            np.minimum(best, sq.min(axis=1), out=best)
    return np.maximum(out, 0.0)


@register
class FarthestPointSampling(Selector):
    """``fps``: greedy max-min Euclidean distance, seeded from ``train`` (METHODS §9)."""

    name = "fps"

    def select(
        self,
        candidates: np.ndarray,
        budget: int,
        train: np.ndarray | None = None,
        **context: Any,
    ) -> Selection:
        candidates = check_features("candidates", candidates)
        train = check_features("train", train, dim=candidates.shape[1])
        b = check_budget(budget, len(candidates))
        if train is not None and len(train):
            nearest = nearest_squared_distance(candidates, np.asarray(train, dtype=np.float64))
        else:
            centroid = np.asarray(candidates, dtype=np.float64).mean(axis=0, keepdims=True)
            nearest = nearest_squared_distance(candidates, centroid)
        picks = np.empty(b, dtype=np.int64)
        scores = np.empty(b)
        for step in range(b):
            c = int(np.argmax(nearest))
            picks[step], scores[step] = c, np.sqrt(nearest[c])
            pick = np.asarray(candidates[c], dtype=np.float64)
            for rows in iter_chunks(len(candidates), candidates.shape[1]):
                diff = np.asarray(candidates[rows], dtype=np.float64) - pick
                np.minimum(nearest[rows], np.einsum("ij,ij->i", diff, diff), out=nearest[rows])
            nearest[c] = -np.inf
        return Selection(picks, scores)
