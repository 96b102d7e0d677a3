"""Dynamic-LLaVA for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .cache_dynamic_llava import DynamicLlavaCache
from .static_cache_dynamic_llava import DynamicLlavaStaticCache
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

# Conversion and processor helpers pull in the tokenizer and image-processing stacks; they load on first access so that
# `import dynamic_llava_hf` stays as light as the model itself.
_LAZY_EXPORTS = {
    "CheckpointError": "convert",
    "ConversionResult": "convert",
    "convert_llava_hf_checkpoint": "convert",
    "convert_original_checkpoint": "convert",
    "load_original_checkpoint": "convert",
    "VICUNA_V1_CHAT_TEMPLATE": "processing",
    "add_llava_special_tokens": "processing",
    "build_image_processor": "processing",
    "build_processor": "processing",
    "demo_model_path": "demo_model",
    "make_samples": "synthetic",
}


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VICUNA_V1_CHAT_TEMPLATE",
    "CheckpointError",
    "ConversionResult",
    "DynamicLlavaCache",
    "DynamicLlavaStaticCache",
    "DynamicLlavaCausalLMOutputWithPast",
    "DynamicLlavaConfig",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlavaModelOutputWithPast",
    "DynamicLlavaPreTrainedModel",
    "SparsitySettings",
    "add_llava_special_tokens",
    "build_image_processor",
    "build_processor",
    "convert_llava_hf_checkpoint",
    "convert_original_checkpoint",
    "demo_model_path",
    "load_original_checkpoint",
    "make_samples",
]
