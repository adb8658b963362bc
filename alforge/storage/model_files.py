"""Model files are trusted only through the store.

Model files hold only weights and settings, read with ``torch.load(weights_only=True)``
(alforge/mlip/mace_model.py), so a planted pickle is refused rather than run. The hash is the
second guard, against a file that is a valid model but not the one trained: the store records each
file's SHA-256 when the model is stored, and nothing is loaded from a path the store names before
the file's hash is checked against that record, so a file replaced under ``runs/`` (often a shared
file system) is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


class ModelFileError(RuntimeError):
    """A model file that is missing or is not the one the store describes."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_model_file(path: str | Path, expected: str | None, what: str) -> Path:
    """``path``, once its SHA-256 equals ``expected`` (the store's record of ``what``).

    Raises :class:`ModelFileError` naming the file and both hashes on a mismatch, and refuses a
    file whose row has no hash (stored before hashes were recorded), since it cannot be checked.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(
            f"{what} is in the store but its file {path} is missing; restore it or start a new campaign"
        )
    if expected is None:
        raise ModelFileError(
            f"{what}: the store has no SHA-256 for {path} (stored before alforge recorded model hashes), "
            "so it is not loaded; start a new campaign to retrain it"
        )
    actual = file_sha256(path)
    if actual != expected:
        raise ModelFileError(
            f"{what}: {path} has SHA-256 {actual}, but the store recorded {expected}; the file was "
            "changed or replaced after it was written and is not loaded"
        )
    return path
