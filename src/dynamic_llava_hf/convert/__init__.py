"""Conversion of checkpoints into self-contained Dynamic-LLaVA folders.

Two kinds of source:
- official Dynamic-LLaVA checkpoints (LLaVA-1.5 code base, github.com/Osilly/dynamic_llava): LLaVA's original key
  layout (`model.layers.*`, `model.mm_projector.{0,2}`, ...) and a nested `sparse_config`; the CLIP tower comes from
  the folder named by `mm_vision_tower`;
- transformers `LlavaForConditionalGeneration` checkpoints (llava-hf), in the legacy or the current key layout: all
  weights are kept and the predictors are new, freshly initialised (the starting point for training).

The output folder is what `save_pretrained` writes (config with `auto_map`, the remote-code files, safetensors weights,
generation config) plus the processor files when the source has a tokenizer and a filled-in model card (README.md).
It is written into a temporary folder next to the destination, verified tensor by tensor, and only then moved into
place; an existing destination is replaced only with `force=True`, and only after everything succeeded.
Weights are read from safetensors; pickle files (`pytorch_model*.bin`) are refused unless `allow_pickle=True`.
"""

from .llava_hf import convert_llava_hf_checkpoint, llava_hf_config_to_config, rename_llava_hf_key
from .original import (
    convert_original_checkpoint,
    load_original_checkpoint,
    original_config_to_config,
    original_state_dict_to_state_dict,
    rename_original_key,
)
from .reading import CheckpointError, read_safetensors_folder, read_weights
from .writer import ConversionResult, model_card_template, verify_saved_weights

__all__ = [
    "CheckpointError",
    "ConversionResult",
    "convert_llava_hf_checkpoint",
    "convert_original_checkpoint",
    "llava_hf_config_to_config",
    "load_original_checkpoint",
    "model_card_template",
    "original_config_to_config",
    "original_state_dict_to_state_dict",
    "read_safetensors_folder",
    "read_weights",
    "rename_llava_hf_key",
    "rename_original_key",
    "verify_saved_weights",
]
