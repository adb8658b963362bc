"""Import every built-in selector module so each registers itself."""

from alforge.selectors import mig, random_selector  # noqa: F401
