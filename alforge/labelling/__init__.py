"""Labellers turn a structure into a reference label (energy, forces, stress) or a classified failure."""
