"""A compiled prefill: the loop over a group of decoder layers as one `torch.compile` graph with dynamic shapes.

At batch 1 on a GPU an eager prefill is bound by launching kernels from Python, not by the GPU: removing 80% of the
image tokens removes FLOPs but no launches, so it is no faster than Llava's. Compiling the layer loops fuses the
elementwise work and launches from generated code. The cache stays outside the graph: inside, a `KeyValueRecorder`
stands in for it (a cache that holds nothing for a group returns a layer's new keys/values unchanged, and so does the
recorder), and the real cache stores the recorded keys/values once the loop is done. So the graph holds no cache
logic, one graph serves every prompt length, and the cache's decisions and layout are exactly those of the eager
path.

Used for forwards whose cache holds nothing for the group yet (a prefill) or that run without a cache, at inference,
when no per-layer outputs (attention weights, hidden states) are asked for; everything else runs the eager loop. The
vision tower and the image predictor, compiled in place, run compiled in every call.
Decoding steps are compiled separately, by `generate(..., cache_implementation="static", compile_config=...)`.

Part of the remote-code bundle: imports only torch, transformers and its sibling files.
"""

import torch

from .compat_dynamic_llava import CACHE_NAME, maybe_install_capturing_hooks


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


def uses_cuda_graphs(torch_compile_kwargs: dict) -> bool:
    """Whether `torch.compile` with these arguments records CUDA graphs (inductor's modes that do, or its
    `triton.cudagraphs` option)."""
    if torch_compile_kwargs.get("backend", "inductor") != "inductor":
        return False
    options = torch_compile_kwargs.get("options") or {}
    mode = torch_compile_kwargs.get("mode")
    return bool(options.get("triton.cudagraphs", mode in ("reduce-overhead", "max-autotune")))


class CompiledPrefillMixin:
    """`DynamicLlavaModel.compile_prefill()` and the dispatch of a layer group to the compiled loop."""

    compiled_layer_loop = None  # `run_decoder_layers` under torch.compile, once `compile_prefill()` was called
    compiled_loop_uses_cuda_graphs = False

    def compile_prefill(self, **torch_compile_kwargs) -> None:
        """Runs the decoder-layer loops of a prefill (a forward with an empty cache, or none) as compiled graphs, one
        per layer group, and compiles the vision tower and the image predictor in place; dynamic shapes unless told
        otherwise (prompts of any length and any number of images share the graphs). `torch_compile_kwargs` go to
        `torch.compile` (e.g. `backend`, `mode`). Outputs are those of the eager modules.

        `mode="reduce-overhead"` adds CUDA graphs on a GPU (a batch-1 prefill is otherwise bound by launching
        kernels): each input shape (batch, prompt length) is run once to warm up, recorded on its second call and
        replayed from the third. As everywhere in PyTorch's CUDA graphs, a graph's outputs live in memory that its
        next call reuses; the model copies what it keeps (the cache entries, the loops' hidden states), but the
        vision tower's own outputs in `output.image_outputs` (`last_hidden_state`, `hidden_states`) are valid only
        until the next compiled call: clone them to keep them."""
        options = {"dynamic": True, **torch_compile_kwargs}
        self.compiled_layer_loop = torch.compile(run_decoder_layers, **options)
        self.compiled_loop_uses_cuda_graphs = uses_cuda_graphs(options)
        # transformers installs the hooks that capture the tower's hidden states (Llava reads one) in its first
        # forward, under a lock dynamo cannot trace: compiled, that call breaks the graph and leaves the tower's
        # wrapper eager for good, with a second compiled frame (and its guard checks) inside at every call.
        if self.vision_tower is not None and maybe_install_capturing_hooks is not None:
            maybe_install_capturing_hooks(self.vision_tower)
        # Both run once per prefill and, left eager, launch hundreds of small kernels at batch 1 (CLIP-L: 24 layers).
        # `Module.compile` compiles in place: parameter names, the state dict and saving stay as they were.
        for module in (self.vision_tower, self.image_score_predictor):
            if module is not None:
                module.compile(**options)

    def uses_compiled_loop(self, step, layout, key_keep: torch.Tensor | None) -> bool:
        """Whether this group runs the compiled loop: one was asked for, inference, no per-layer outputs, and nothing
        stored for the group yet (its cache would only hand each layer's new keys/values back)."""
        return (
            self.compiled_layer_loop is not None
            and not self.training
            and key_keep is None
            and step.all_attentions is None
            and step.all_hidden_states is None
            and layout.past_width == 0
        )

    def run_compiled_loop(self, layers, step, cache, mask, **kwargs) -> None:
        """Runs `layers` over the step's slots in the compiled loop; then the cache (if any) stores their K/V."""
        recorder = KeyValueRecorder() if cache is not None else None
        hidden_states = self.compiled_layer_loop(
            layers, step.hidden_states, mask, step.position_embeddings, recorder, **kwargs
        )
        # Under CUDA graphs the output lives in the graphs' memory pool, which the next compiled call (the image
        # predictor's, the next group's) hands to its own outputs; the step still needs it after that.
        step.hidden_states = hidden_states.clone() if self.compiled_loop_uses_cuda_graphs else hidden_states
        if recorder is not None:
            recorder.write_to(cache)
