"""A compiled prefill: the loop over a group of decoder layers as one `torch.compile` graph with dynamic shapes.

At batch 1 on a GPU an eager prefill is bound by launching kernels from Python, not by the GPU: removing 80% of the
image tokens removes FLOPs but no launches, so it is no faster than Llava's. Compiling the layer loops fuses the
elementwise work and launches from generated code. The cache stays outside the graph: inside, a `KeyValueRecorder`
stands in for it (a cache that holds nothing for a group returns a layer's new keys/values unchanged, and so does the
recorder), and the real cache stores the recorded keys/values once the loop is done. So the graph holds no cache
logic, one graph serves every prompt length, and the cache's decisions and layout are exactly those of the eager
path.

Used for forwards whose cache holds nothing for the group yet (a prefill) or that run without a cache, at inference,
when no per-layer outputs (attention weights, hidden states) are asked for; everything else runs the eager loop.
Decoding steps are compiled separately, by `generate(..., cache_implementation="static", compile_config=...)`.

Part of the remote-code bundle: imports only torch, transformers and its sibling files.
"""

import torch

from .compat_dynamic_llava import CACHE_NAME


def run_decoder_layers(layers, hidden_states, mask, position_embeddings, cache, **kwargs) -> torch.Tensor:
    """The bare loop over `layers` (what `compile_prefill` compiles)."""
    for layer in layers:
        hidden_states = layer(
            hidden_states, mask, position_embeddings=position_embeddings, **{CACHE_NAME: cache}, **kwargs
        )
    return hidden_states


class KeyValueRecorder:
    """The cache as the layers see it inside a compiled prefill: records each layer's new keys/values and returns
    them, which is what a cache holding nothing for the layer's group returns."""

    def __init__(self):
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.records.append((layer_idx, key_states, value_states))
        return key_states, value_states

    def write_to(self, cache) -> None:
        """Stores the recorded keys/values in `cache` (planned by `begin_step`), releasing each record as it goes."""
        while self.records:
            layer_idx, key_states, value_states = self.records.pop(0)
            cache.update(key_states, value_states, layer_idx)


def compile_layer_loop(**torch_compile_kwargs):
    """`run_decoder_layers` under `torch.compile`, with dynamic shapes unless told otherwise (so prompts of any
    length share one graph per layer group)."""
    return torch.compile(run_decoder_layers, **{"dynamic": True, **torch_compile_kwargs})
