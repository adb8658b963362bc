"""Import every built-in selector module so each registers itself."""

from alforge.selectors import committee, dopt, fps, mig, random_selector, target_aware  # noqa: F401
