"""alforge: an active-learning workflow engine for machine-learned interatomic potentials."""

__version__ = "0.1.0"
