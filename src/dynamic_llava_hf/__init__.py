"""Dynamic-LLaVA for Hugging Face Transformers."""

from .cache_dynamic_llava import DynamicLlavaCache
from .configuration_dynamic_llava import DynamicLlavaConfig
from .modeling_dynamic_llava import (
    DynamicLlavaCausalLMOutputWithPast,
    DynamicLlavaForConditionalGeneration,
    DynamicLlavaModel,
    DynamicLlavaModelOutputWithPast,
    DynamicLlavaPreTrainedModel,
    SparsitySettings,
)


__version__ = "0.1.0"

__all__ = [
    "DynamicLlavaCache",
    "DynamicLlavaConfig",
    "DynamicLlavaCausalLMOutputWithPast",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlavaModelOutputWithPast",
    "DynamicLlavaPreTrainedModel",
    "SparsitySettings",
]
