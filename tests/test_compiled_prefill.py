"""`compile_prefill()`: the prefill's decoder-layer loops as compiled graphs give the eager prefill's logits, tokens
and cache entries; everything the compiled loop does not cover runs eagerly.

Most tests compile with dynamo's "aot_eager" backend (the same graphs, no generated code: seconds, not minutes); one
compiles with inductor.
"""

import pytest
import torch

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from dynamic_llava_hf.compiled_prefill_dynamic_llava import run_decoder_layers, uses_cuda_graphs
from test_generation import ROWS, generate
from test_static_cache import assert_same_cache, assert_same_generation
from tiny_models import build_prompts, tiny_model


def count_compiled_loop_calls(model) -> list[tuple[int, ...]]:
    """Wraps the model's compiled layer loop (after `compile_prefill()`); the list gets each call's hidden-states
    shape."""
    loop, calls = model.model.compiled_layer_loop, []

    def counted(layers, hidden_states, *args, **kwargs):
        calls.append(tuple(hidden_states.shape))
        return loop(layers, hidden_states, *args, **kwargs)

    model.model.compiled_layer_loop = counted
    return calls


def compiled_twin(attn_implementation="sdpa", backend="aot_eager"):
    """An eager tiny model, and the same model (same seed) with a compiled prefill whose loop calls are counted."""
    eager, compiled = tiny_model(attn_implementation), tiny_model(attn_implementation)
    compiled.compile_prefill(backend=backend)
    return eager, compiled, count_compiled_loop_calls(compiled)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_compiled_prefill_equals_eager(attn_implementation):
    """A left-padded batch: the same tokens, logits and cache; the compiled loop ran once per layer group, in the
    prefill only (decoding steps have stored entries, so they run eagerly)."""
    eager, compiled, calls = compiled_twin(attn_implementation)
    inputs = build_prompts(ROWS)
    expected = generate(eager, *inputs)
    got = generate(compiled, *inputs)
    assert_same_generation(expected, got)
    assert_same_cache(expected.get(CACHE_NAME), got.get(CACHE_NAME))
    prompt_length = inputs[0].shape[1]
    assert len(calls) == 2 and calls[0][1] == prompt_length and calls[1][1] < prompt_length  # pruned for group 2


def test_prompts_of_other_lengths_and_generation_without_cache():
    """Other prompt lengths reuse the graphs (dynamic shapes); without a cache every step is a compiled full forward
    and still gives the cached eager generation's tokens."""
    eager, compiled, calls = compiled_twin()
    for rows in (ROWS, [(2, 1, 9)], [(5, 1, 1), (1, 1, 4)]):
        inputs = build_prompts(rows)
        assert_same_generation(generate(eager, *inputs), generate(compiled, *inputs))
    inputs = build_prompts(ROWS)
    calls.clear()
    uncached = generate(compiled, *inputs, use_cache=False)
    assert torch.equal(uncached.sequences, generate(eager, *inputs).sequences)
    assert len(calls) == 2 * 12  # both groups, at each of the 12 forwards


def test_static_cache_and_compiled_prefill():
    eager, compiled, calls = compiled_twin()
    inputs = build_prompts(ROWS)
    expected = generate(eager, *inputs)
    got = generate(compiled, *inputs, cache_implementation="static", disable_compile=True)
    assert_same_generation(expected, got)
    assert len(calls) == 2


def test_what_the_compiled_loop_does_not_cover_runs_eagerly():
    """Attention weights or hidden states asked for, training, and a prefill chunk after a cached one (its cache
    already holds entries) use the eager loop."""
    eager, compiled, calls = compiled_twin("eager")
    inputs = build_prompts(ROWS)
    input_ids, attention_mask, pixel_values = inputs
    with torch.no_grad():
        for options in ({"output_attentions": True}, {"output_hidden_states": True}):
            out = compiled(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **options)
            expected = eager(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **options)
            torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    compiled.train()
    compiled(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, sparsity=False)
    compiled.eval()
    assert calls == []
    whole = generate(eager, *inputs)
    chunked = generate(compiled, *inputs, prefill_chunk_size=input_ids.shape[1] - 2)
    assert_same_generation(whole, chunked)
    assert len(calls) == 2  # the first chunk only


@pytest.mark.inductor
def test_inductor_compiled_prefill_equals_eager():
    """The real compiler (inductor's generated code fuses and reorders float operations: equal within float32
    rounding, the same greedy tokens)."""
    eager, compiled, calls = compiled_twin(backend="inductor")
    inputs = build_prompts(ROWS)
    expected, got = generate(eager, *inputs), generate(compiled, *inputs)
    assert torch.equal(expected.sequences, got.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)
    assert len(calls) == 2


def test_vision_tower_and_image_predictor_compile_in_place(tmp_path):
    """Both run compiled (a backend records the graphs it is given), the state dict keeps its keys, and the model
    saves and reloads as before."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(" ".join(node.name for node in graph_module.graph.nodes if node.op == "placeholder"))
        return graph_module.forward

    eager, compiled = tiny_model(), tiny_model()
    keys = list(compiled.state_dict())
    compiled.compile_prefill(backend=recording_backend)
    inputs = build_prompts(ROWS)
    expected = generate(eager, *inputs)
    assert_same_generation(expected, generate(compiled, *inputs))
    assert any("patch_embedding" in names for names in graphs)  # the vision tower
    assert any("down_mlp" in names for names in graphs)  # the image predictor
    assert list(compiled.state_dict()) == keys
    compiled.save_pretrained(tmp_path)
    assert_same_generation(expected, generate(type(compiled).from_pretrained(tmp_path), *inputs))


def test_a_compiled_prefill_has_no_graph_breaks():
    """Each compiled function traces whole: a graph break would leave part of it eager, with a compiled frame (and
    its guard checks) per piece at every prefill. The vision tower's output-capturing hooks, which transformers
    installs in a first forward under a lock dynamo cannot trace, are installed by `compile_prefill` instead."""
    counters = torch._dynamo.utils.counters
    model = tiny_model()
    model.compile_prefill(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    generate(model, *build_prompts(ROWS))
    assert dict(counters["graph_break"]) == {}
    assert model.model.vision_tower._output_capturing_hooks_installed
    # vision tower, image predictor, and the loop for each layer group (its layers differ: a graph of its own)
    assert counters["stats"]["unique_graphs"] == 4


def test_which_compile_arguments_record_cuda_graphs():
    """Under CUDA graphs the compiled loop's hidden states are copied out of the graphs' memory pool (the next compiled
    call reuses it); these arguments say whether that applies."""
    assert not uses_cuda_graphs({})
    assert uses_cuda_graphs({"mode": "reduce-overhead"}) and uses_cuda_graphs({"mode": "max-autotune"})
    assert not uses_cuda_graphs({"mode": "max-autotune-no-cudagraphs"})
    assert uses_cuda_graphs({"options": {"triton.cudagraphs": True}})
    assert not uses_cuda_graphs({"mode": "reduce-overhead", "backend": "aot_eager"})  # inductor's option only
    model = tiny_model()
    model.compile_prefill(backend="aot_eager")
    assert not model.model.compiled_loop_uses_cuda_graphs


class GraphPool:
    """Emulates, on the CPU, what CUDA graphs do to their outputs: they live in a memory pool that the next graphed
    call reuses. Every output of a wrapped call (the layer loop's hidden states and recorded keys/values, the vision
    tower's and the image predictor's outputs) is filled with NaN when the next wrapped call starts, so a model that
    reads one afterwards produces NaN or other tokens."""

    def __init__(self):
        self.live: list[torch.Tensor] = []
        self.calls = 0

    def overwrite(self) -> None:
        self.calls += 1
        for tensor in self.live:
            tensor.fill_(float("nan"))
        self.live = []

    def keep(self, output) -> None:
        if isinstance(output, torch.Tensor):
            self.live.append(output)
        elif isinstance(output, (tuple, list)):
            for item in output:
                self.keep(item)
        elif isinstance(output, dict):  # ModelOutput
            for item in output.values():
                self.keep(item)

    def wrap_loop(self, loop):
        def graphed_loop(layers, hidden_states, mask, position_embeddings, recorder, **kwargs):
            self.overwrite()
            output = loop(layers, hidden_states, mask, position_embeddings, recorder, **kwargs)
            self.keep(output)
            if recorder is not None:
                self.keep([key_value for _, *key_value in recorder.records])
            return output

        return graphed_loop

    def wrap_module(self, module) -> None:
        module.register_forward_pre_hook(lambda module, args: self.overwrite())
        module.register_forward_hook(lambda module, args, output: self.keep(output))


@pytest.mark.parametrize("copies_hidden_states", [True, False])
def test_prefill_reads_no_graph_output_after_the_next_graphed_call(copies_hidden_states):
    """The invariant CUDA graphs (`compile_prefill(mode="reduce-overhead")`) rely on, checked on the CPU with
    `GraphPool`: with the loop's hidden states copied out (what the model does under CUDA graphs), generation gives the
    eager tokens, logits and cache, twice in a row; without the copy, the pruning after the image predictor's call
    reads overwritten hidden states (the check has teeth)."""
    eager, graphed = tiny_model(), tiny_model()
    pool = GraphPool()
    graphed.model.compiled_layer_loop = pool.wrap_loop(run_decoder_layers)
    graphed.model.compiled_loop_uses_cuda_graphs = copies_hidden_states
    for module in (graphed.model.vision_tower, graphed.model.image_score_predictor):
        pool.wrap_module(module)
    inputs = build_prompts(ROWS)
    expected = generate(eager, *inputs)
    if not copies_hidden_states:
        with pytest.raises(AssertionError):
            assert_same_generation(expected, generate(graphed, *inputs))
        return
    for _ in range(2):
        got = generate(graphed, *inputs)
        assert_same_generation(expected, got)
        assert_same_cache(expected.get(CACHE_NAME), got.get(CACHE_NAME))
    assert pool.calls == 2 * 4  # per generation: vision tower, loop, image predictor, loop
