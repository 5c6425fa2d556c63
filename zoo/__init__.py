"""zoo: a Lightning model zoo for studying what normalization does to a model."""
from zoo.checkpoint import CheckpointError, load
from zoo import models  # noqa: F401  (registers the models with timm)

__all__ = ["load", "CheckpointError"]
__version__ = "0.1.0"
