"""zoo test suite (a package, so `tests.conftest` is ours, not another distribution's top-level `tests`)."""
