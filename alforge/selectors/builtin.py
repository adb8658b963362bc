"""Import every built-in selector module so each registers itself."""

from alforge.selectors import (  # noqa: F401
    committee,
    dopt,
    fps,
    label_mig,
    lpr,
    ltau,
    mig,
    probe,
    random_selector,
    target_aware,
)
