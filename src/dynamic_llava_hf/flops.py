"""Moved to `dynamic_llava_hf.bench.flops`; this alias keeps `dynamic_llava_hf.flops` imports working."""

from .bench.flops import *  # noqa: F403
