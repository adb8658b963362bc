"""Prefect flows: they only order tasks; the work and the persistence live in ``alforge.tasks``."""
