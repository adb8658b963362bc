"""The MLIP backend: MACE training, evaluation and feature extraction on plain ``Atoms``.

Nothing here imports the store or Prefect (see docs/ARCHITECTURE.md).
"""
