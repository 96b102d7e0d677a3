"""Dynamic-LLaVA for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

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


# An installed package needs no trust_remote_code: the Auto classes map model_type "dynamic_llava" to these classes.
AutoConfig.register(DynamicLlavaConfig.model_type, DynamicLlavaConfig, exist_ok=True)
AutoModel.register(DynamicLlavaConfig, DynamicLlavaModel, exist_ok=True)
AutoModelForImageTextToText.register(DynamicLlavaConfig, DynamicLlavaForConditionalGeneration, exist_ok=True)

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
