"""Moved to `dynamic_llava_hf.train.data`; this alias keeps `dynamic_llava_hf.data` imports working."""

from .train.data import *  # noqa: F403
from .train.data import __all__  # noqa: F401
