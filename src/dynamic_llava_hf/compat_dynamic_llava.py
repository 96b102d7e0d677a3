"""The one place that knows which transformers release runs the remote code (supported: 5.23 and 5.24).

What differs between them, and nothing else does for this package:

- 5.24 renamed the KV cache from `past_key_values` to `cache`: decoder layers, model forwards and `generate()` take
  `cache=`, and every `ModelOutput` holds it in a `cache` field. The old names still work in 5.24 but log or raise a
  deprecation warning, so the code below always uses the name of the running release.
- 5.24's Llava outputs carry the vision encoder's output as `image_outputs` (a `BaseModelOutputWithPooling`);
  `image_hidden_states` became a deprecated property there. Our outputs keep `image_hidden_states` as a plain field on
  both releases and fill `image_outputs` where it exists.

One internal helper is imported where it exists (both releases have it): the installer of the hooks that capture a
vision tower's hidden states (see `compile_prefill`).

Part of the remote-code bundle: imports only transformers.
"""

from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast


try:  # internal to transformers: a release without it costs `compile_prefill` one graph break, nothing else
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError:
    maybe_install_capturing_hooks = None

# The cache's name in forwards, decoder layers, `generate()`'s model kwargs and outputs: "cache" from 5.24 on.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Whether Llava's outputs have the `image_outputs` field (5.24 on).
HAS_IMAGE_OUTPUTS = "image_outputs" in LlavaCausalLMOutputWithPast.__dataclass_fields__


def cache_argument(cache, past_key_values):
    """The cache a forward was given, under either name (both are accepted on every supported release)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def cache_and_image_fields(cache, image_outputs) -> dict:
    """Output keyword arguments: the cache under the running release's name, plus `image_outputs` where it exists."""
    fields = {CACHE_NAME: cache}
    if HAS_IMAGE_OUTPUTS:
        fields["image_outputs"] = image_outputs
    return fields


__all__ = [
    "CACHE_NAME",
    "HAS_IMAGE_OUTPUTS",
    "cache_argument",
    "cache_and_image_fields",
    "maybe_install_capturing_hooks",
]
