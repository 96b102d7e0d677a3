"""The base class of the Dynamic-LLaVA models: class flags, weight initialisation, and saving as remote code."""

from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from .configuration_dynamic_llava import DynamicLlavaConfig


# What a saved folder's config.json names as remote code, so it loads with `trust_remote_code=True` where this package
# is not installed. transformers only writes the entry of the class being saved, so all of them are set explicitly.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_dynamic_llava.DynamicLlavaConfig",
    "AutoModel": "modeling_dynamic_llava.DynamicLlavaModel",
    "AutoModelForImageTextToText": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
}
# That remote code: this file and every file it imports (flat: transformers copies them next to the weights).
_BUNDLE = (
    "configuration", "modeling", "pretrained", "cache", "static_cache", "predictors", "sparsity", "inference",
    "training", "compat", "outputs", "generation", "compiled_prefill",
)  # fmt: skip
REMOTE_CODE_FILES = tuple(f"{name}_dynamic_llava.py" for name in _BUNDLE)


def _not_custom_code() -> bool:
    return False


class DynamicLlavaPreTrainedModel(LlavaPreTrainedModel):
    config_class = DynamicLlavaConfig
    # Decoding steps with the fixed-capacity cache (cache_implementation="static") compile as one graph.
    _can_compile_fullgraph = True
    _supports_flex_attn = False
    _supports_attention_backend = False
    # `_keep_in_fp32_modules` (set by the two models below): never weight-quantised, as every quantizer (bitsandbytes
    # 8/4-bit, torchao, ...) adds these to its `modules_to_not_convert`, even when the user passes their own skip
    # list. The predictors' keep/drop decisions compare two close logits, and the vision tower and projector are small
    # next to the decoder. transformers also keeps them in float32 when a model is loaded in float16 (not bfloat16).
    # Quantizers match these names from the start of a module's path, so each model names its own paths, and only
    # the predictors it built.

    def initialize_weights(self):
        # transformers takes every model defined outside its own package for custom code, and for custom code it skips
        # the `_init_weights` of a module whose own parameters are all set (assuming a custom `_init_weights` would
        # overwrite loaded weights). Modules that initialise their children's weights are then skipped once the
        # children are done: CLIP's attention and MLP blocks scale their projections, so vision-tower weights missing
        # from a checkpoint got plain `nn.Linear` values instead of what a freshly built model (or Llava) gives them.
        # Every `_init_weights` this model runs is transformers' own (Llava's, CLIP's, Llama's), which leave loaded
        # weights alone: initialise as transformers does its own models. (transformers' common test
        # `test_can_init_all_missing_weights`.)
        self.is_custom_code = _not_custom_code  # shadows the class method on this instance for the call
        try:
            return super().initialize_weights()
        finally:
            del self.is_custom_code

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `_auto_class` (set in modeling_dynamic_llava.py) makes transformers copy the model's file, its relative
        # imports and the config file next to the weights; the full auto_map makes every Auto class resolve them.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)
