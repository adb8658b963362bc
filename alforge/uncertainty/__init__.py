"""Uncertainty from the last-layer Hessian (prediction rigidities) and its calibration.

``rigidity`` implements METHODS §2; ``calibration`` implements METHODS §8. Plain arrays in and out.
"""
