"""Moved to `dynamic_llava_hf.train.trainer`; this alias keeps `dynamic_llava_hf.training` imports working."""

from .train.trainer import *  # noqa: F403
from .train.trainer import __all__  # noqa: F401
