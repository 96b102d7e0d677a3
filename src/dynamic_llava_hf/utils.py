"""Helpers the commands share (conversion, benchmark): dtype names and progress bars. Not part of the remote code."""

import torch
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging


def torch_dtype(name: "str | torch.dtype | None") -> torch.dtype | None:
    """The floating-point dtype named as transformers' `from_pretrained(dtype=...)` takes it: a `torch.dtype` or the
    name of one ("bfloat16", "float16", "float32", "half", ...). None and "auto" give None: the caller's default."""
    if name is None or name == "auto":
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else name
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be 'auto' or a torch floating-point dtype such as bfloat16, got {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """The name `torch_dtype` reads back ("bfloat16" for `torch.bfloat16`)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def progress_bar(*args, enabled: bool = True, **kwargs):
    """A tqdm bar that follows the global switch of transformers (`logging.disable_progress_bar()`) and of
    huggingface_hub (`disable_progress_bars()`, `HF_HUB_DISABLE_PROGRESS_BARS=1`), and `enabled` on top."""
    if not enabled or are_progress_bars_disabled():
        kwargs["disable"] = True
    return logging.tqdm(*args, **kwargs)


__all__ = ["dtype_name", "progress_bar", "torch_dtype"]
