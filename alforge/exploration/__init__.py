"""Exploration: run dynamics with the current model to find candidate structures."""
