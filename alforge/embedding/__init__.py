"""Embedding: small, labellable structures that hold one atom's environment of a large structure
(METHODS §5: cluster carving, periodic and high-symmetry embedding). Works on ase.Atoms only; imports
neither the store nor Prefect."""

from alforge.embedding.api import DEFAULT_BUFFER, STRATEGIES, embed

__all__ = ["DEFAULT_BUFFER", "STRATEGIES", "embed"]
