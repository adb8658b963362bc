"""Lazy greedy maximisation for scores that can only decrease as picks accumulate.

MIG, label MIG and MaxDet scores are monotone non-increasing in the picks made so far (adding to
``H`` can only shrink ``fᵀH⁻¹f``; log det is submodular), so a score computed after fewer picks is a
valid upper bound (METHODS §3, "lazy greedy"). Picking the candidate whose *fresh* score beats every
other candidate's *stale* bound therefore gives exactly the plain greedy pick, while re-scoring only
the few candidates near the top instead of all N per step.

Candidates are refreshed in blocks (the current top-k by bound, k growing ×4 until the test
passes), so refreshing is a small GEMM instead of one Python call per candidate. The whole loop
runs on one BLAS thread (see :mod:`alforge.uncertainty.blas_threads`): it is a long run of tiny
calls, and switching the thread count costs ~40 µs each time, more than most of the calls. Only
refresh blocks above :data:`_SMALL_BLOCK` candidates get the default thread count back.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from alforge.uncertainty.blas_threads import _CONTROLLER, single_threaded_blas

#: Refresh blocks up to this many candidates run with one BLAS thread.
_SMALL_BLOCK = 4096

#: ``refresh(indices, stale_scores, fresh_at)``: exact current scores of ``indices``, whose stored
#: ``stale_scores`` were exact after ``fresh_at[k]`` picks (so an incremental scorer only has to
#: account for the picks made since).
Refresh = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
#: ``commit(index)``: fold a pick into the scorer's state before the next step.
Commit = Callable[[int], None]


def lazy_greedy(
    initial_scores: np.ndarray,
    budget: int,
    refresh: Refresh,
    commit: Commit,
    first_block: int = 64,
    first_pool: int = 4096,
    exact_initial: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy picks without replacement under non-increasing scores.

    ``initial_scores`` must be exact before any pick, or, with ``exact_initial=False``, upper
    bounds of the exact scores (then every candidate is refreshed before it can be picked, and
    ``refresh`` sees ``fresh_at = -1`` for scores that were never exact).

    Returns ``(picks, scores, n_refreshed)``: candidate indices in pick order, each pick's exact
    score when picked, and how many candidate re-scorings were needed (a diagnostic: plain greedy
    would need about N per step).

    The search runs inside a *pool*, the ``first_pool`` candidates with the largest bounds, so a
    step costs O(pool) rather than O(N); everything outside the pool is bounded by ``ceiling``. A
    pick is certified when its fresh score beats both the rest of its block and the ceiling;
    if the whole pool is fresh and still loses to the ceiling, the pool grows ×4 from all N.
    """
    bounds = np.array(initial_scores, dtype=np.float64)
    n = bounds.size
    fresh_at = np.full(n, 0 if exact_initial else -1, dtype=np.int64)
    picks = np.empty(budget, dtype=np.int64)
    scores = np.empty(budget, dtype=np.float64)
    n_refreshed = 0
    pool, ceiling = _top(bounds, first_pool, n)
    threads = blas_thread_count()
    with single_threaded_blas():
        for step in range(budget):
            if pool.size == 0:
                pool, ceiling = _top(bounds, first_pool, n - step)
            k = min(first_block, pool.size)
            while True:
                if k < pool.size:
                    block = pool[np.argpartition(-bounds[pool], k - 1)[:k]]
                    # Every pool member outside the block has a bound <= the block's smallest.
                    outside = max(bounds[block].min(), ceiling)
                else:
                    block, outside = pool, ceiling
                stale = block[fresh_at[block] < step]
                if stale.size:
                    if stale.size > _SMALL_BLOCK:
                        with _CONTROLLER.limit(limits=threads, user_api="blas"):
                            bounds[stale] = refresh(stale, bounds[stale], fresh_at[stale])
                    else:
                        bounds[stale] = refresh(stale, bounds[stale], fresh_at[stale])
                    fresh_at[stale] = step
                    n_refreshed += stale.size
                best = int(block[np.argmax(bounds[block])])
                if bounds[best] >= outside:
                    break
                if k < pool.size:
                    k = min(4 * k, pool.size)
                else:
                    pool, ceiling = _top(bounds, 4 * pool.size, n - step)
                    k = min(4 * k, pool.size)
            picks[step] = best
            scores[step] = bounds[best]
            commit(best)
            bounds[best] = -np.inf
            pool = pool[pool != best]
    return picks, scores, n_refreshed


def blas_thread_count() -> int:
    """The BLAS thread count in force now, restored inside the one-thread loop for big blocks."""
    counts = [m["num_threads"] for m in _CONTROLLER.select(user_api="blas").info()]
    return max(counts, default=1)


def _top(bounds: np.ndarray, size: int, remaining: int) -> tuple[np.ndarray, float]:
    """The ``size`` largest bounds among unpicked candidates, and a bound on all the others."""
    if size >= remaining:
        return np.flatnonzero(bounds > -np.inf), -np.inf
    order = np.argpartition(-bounds, size - 1)
    return order[:size], float(bounds[order[size - 1]])
