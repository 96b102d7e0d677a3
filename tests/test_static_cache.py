"""The fixed-capacity cache (`cache_implementation="static"`): the dynamic cache's tokens, logits and stored entries in
eager decoding, one graph for the decoding step, and compiled (inductor) decoding equal to eager decoding.

The inductor tests compile a few graphs (about a minute each on a 2-core CPU with a cold compile cache, seconds with a
warm one), so they are kept to a minimum; the graph checks use dynamo's "eager" backend, which traces the same graph
without generating code.
"""

import functools

import pytest
import torch
from transformers import CompileConfig

from dynamic_llava_hf import DynamicLlavaStaticCache
from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from dynamic_llava_hf.static_cache_dynamic_llava import StaticRowLengths
from test_generation import NEW_TOKENS, ROWS, generate, rows_alone
from tiny_models import build_prompts, tiny_model
from tolerances import FP32_SAME_MATH, FP32_SAME_OP


MODES = {
    "greedy": {},
    "beam": {"num_beams": 3, "output_scores": True, "max_new_tokens": 8},
    "sample": {"do_sample": True, "num_return_sequences": 2},
}


def run(model, mode: str, inputs, **kwargs):
    torch.manual_seed(5)  # the same draws for sampling
    return generate(model, *inputs, **{**MODES[mode], **kwargs})  # kwargs may override the mode's options


def assert_same_generation(a, b, logits: bool = True):
    assert torch.equal(a.sequences, b.sequences)
    if logits:
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=0, atol=FP32_SAME_MATH)
    if a.get("sequences_scores") is not None:
        torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=0, atol=FP32_SAME_MATH)


def assert_same_cache(ours, theirs):
    """The same stored entries (per layer and row, keys and values), lengths and sparsity report."""
    assert torch.equal(ours.stored_lengths(), theirs.stored_lengths())
    assert ours.sparsity_report() == theirs.sparsity_report()
    for mine, other, lengths in zip(ours.layers, theirs.layers, ours.stored_lengths()):
        for row, length in enumerate(lengths.tolist()):
            for name in ("keys", "values"):
                torch.testing.assert_close(
                    getattr(mine, name)[row, :, :length],
                    getattr(other, name)[row, :, :length],
                    rtol=0,
                    atol=FP32_SAME_OP,
                )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", list(MODES))
def test_static_cache_equals_dynamic_cache(attn_implementation, mode):
    model = tiny_model(attn_implementation)
    inputs = build_prompts(ROWS)
    dynamic = run(model, mode, inputs)
    static = run(model, mode, inputs, cache_implementation="static")
    assert isinstance(static.get(CACHE_NAME), DynamicLlavaStaticCache)
    assert_same_generation(dynamic, static)
    ours, theirs = static.get(CACHE_NAME), dynamic.get(CACHE_NAME)
    assert_same_cache(ours, theirs)
    assert ours.get_seq_length() == theirs.get_seq_length()


@pytest.mark.parametrize(
    "options",
    [
        {"prefill_chunk_size": 19},  # chunks after the first are multi-token forwards on a filled static cache
        {"sparsity": False},
        {"sparsity": {"vision_selector": "fastv"}},
        {"output_attentions": True, "max_new_tokens": 5},  # weights mapped back from the buffers' fixed columns
    ],
)
def test_static_cache_equals_dynamic_cache_with_options(options):
    model = tiny_model("eager")
    inputs = build_prompts(ROWS)
    dynamic = generate(model, *inputs, **options)
    static = generate(model, *inputs, cache_implementation="static", **options)
    assert_same_generation(dynamic, static)
    for ours, theirs in zip(static.get("attentions") or (), dynamic.get("attentions") or ()):
        for mine, other in zip(ours, theirs):
            torch.testing.assert_close(mine, other, rtol=0, atol=FP32_SAME_OP)


def test_static_cache_batched_equals_per_row():
    model = tiny_model()
    inputs = build_prompts(ROWS)
    batched = generate(model, *inputs, cache_implementation="static")
    prompt = inputs[0].shape[1]
    for row, ids, mask, pixels in rows_alone(*inputs, ROWS):
        alone = generate(model, ids, mask, pixels, cache_implementation="static")
        assert torch.equal(batched.sequences[row, prompt:], alone.sequences[0, ids.shape[1] :])
        assert (torch.stack(batched.logits)[:, row] - torch.stack(alone.logits)[:, 0]).abs().max() <= FP32_SAME_MATH
    kept = [entry["generated_tokens_kept"] for entry in batched.get(CACHE_NAME).sparsity_report()]
    assert len(set(kept)) > 1, "rows should keep different numbers of generated tokens"


def test_capacity_is_sized_once_for_the_worst_case():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    new_tokens = 49
    out = generate(model, input_ids, attention_mask, pixel_values, cache_implementation="static", max_new_tokens=49)
    cache = out.get(CACHE_NAME)
    prompt, pruned = input_ids.shape[1], 9 - 4  # each row's one image keeps 4 of its 9 tokens
    full, sparse = cache.groups
    # Rounded up to a multiple of 64: the full layers need prompt + new - 1 = 69, the sparse ones 5 fewer.
    assert (full.capacity, sparse.capacity) == (128, 64)
    assert prompt - pruned + new_tokens - 1 <= sparse.capacity < prompt + new_tokens - 1 <= full.capacity
    assert cache.growth_events() == 0  # allocated once, at the prefill
    layer = cache.layers[0]
    entry_bytes = 2 * layer.key_buffer.shape[1] * layer.key_buffer.shape[-1] * layer.key_buffer.element_size()
    sparse_layer, layers = model.config.sparse_layer, len(cache.layers)
    expected = len(ROWS) * entry_bytes * (sparse_layer * 128 + (layers - sparse_layer) * 64)
    assert cache.allocated_kv_bytes() == expected
    with pytest.raises(ValueError, match="max_cache_len"):
        DynamicLlavaStaticCache(model.config)


@pytest.mark.parametrize("turn_tokens", [4, 0])  # 0: the next call's prefill is the one token not yet fed
def test_a_second_turn_grows_a_passed_cache(turn_tokens):
    """A continuation passing the static cache back gets room for its own tokens, with the dynamic cache's result."""
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    second_turn = torch.tensor([[11, 12, 13, 14][:turn_tokens]] * len(ROWS), dtype=torch.long)
    results = []
    for implementation in (None, "static"):
        first = generate(model, input_ids, attention_mask, pixel_values, cache_implementation=implementation)
        ids = torch.cat([first.sequences, second_turn], dim=1)
        mask = torch.cat([attention_mask, torch.ones(len(ROWS), ids.shape[1] - attention_mask.shape[1])], dim=1)
        cache = first.get(CACHE_NAME)
        results.append(generate(model, ids, mask.long(), None, max_new_tokens=60, **{CACHE_NAME: cache}))
    assert_same_generation(*results)
    assert results[1].get(CACHE_NAME).groups[0].capacity >= results[1].sequences.shape[1]


def new_tokens(mode: str) -> int:
    return MODES[mode].get("max_new_tokens", NEW_TOKENS)


def windowed_cache(model, inputs, mode: str) -> DynamicLlavaStaticCache:
    """A static cache with small capacity steps and, where windows come from the bound (GPU), at most 4 window sizes
    growing by 2 columns at least: the tiny generations here take several windows, each smaller than the buffers."""
    max_cache_len = inputs[0].shape[1] + new_tokens(mode)
    return DynamicLlavaStaticCache(model.config, max_cache_len=max_cache_len, capacity_step=2, window_buckets=4)


def record_windows(monkeypatch) -> list:
    """(group, columns read, columns needed: one past the longest row) of every eager decoding step, as the cache
    hands them to the layers."""
    seen, take_window = [], StaticRowLengths.take_window

    def recording(rows):
        columns = take_window(rows)
        if not torch.compiler.is_compiling():
            seen.append((rows, columns, int(rows.lengths.max()) + 1))
        return columns

    monkeypatch.setattr(StaticRowLengths, "take_window", recording)
    return seen


@pytest.mark.parametrize("host_lengths", [True, False], ids=["lengths-read", "bound-only"])
@pytest.mark.parametrize("mode", list(MODES))
def test_read_windows_equal_whole_buffers(mode, host_lengths, monkeypatch):
    """generate() plans each decoding step's read window on the host: from the lengths (CPU), exactly the longest row
    and the new token; from a bound alone (what a GPU gets, no synchronisation), a few growing sizes that cover them.
    Windowed steps give the dynamic cache's tokens, logits and stored entries while reading fewer columns than the
    buffers hold."""
    model = tiny_model()
    inputs = build_prompts(ROWS)
    dynamic = run(model, mode, inputs)
    monkeypatch.setattr(StaticRowLengths, "read_lengths_on_host", host_lengths)
    windows = record_windows(monkeypatch)
    static = run(model, mode, inputs, **{CACHE_NAME: windowed_cache(model, inputs, mode)})
    assert_same_generation(dynamic, static)
    cache = static.get(CACHE_NAME)
    assert_same_cache(cache, dynamic.get(CACHE_NAME))
    for rows in cache.groups:
        steps = [(columns, needed) for group, columns, needed in windows if group is rows]
        assert len(steps) == new_tokens(mode) - 1  # every decoding step
        sizes = [columns for columns, _ in steps]
        assert min(sizes) < rows.capacity
        if host_lengths:
            assert all(columns == needed for columns, needed in steps)
        else:
            assert all(columns >= needed for columns, needed in steps)
            assert sizes == sorted(sizes) and 1 < len(set(sizes)) <= 4  # the bound grows by a token per step


def test_unplanned_steps_read_whole_buffers(monkeypatch):
    """A decoding step that generate() did not plan (a forward called by hand) reads every column, and so do later
    planned ones until a multi-token forward tells the host again how long the rows are."""
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    cache = windowed_cache(model, (input_ids,), "greedy")
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prefill = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        position_ids=positions,
        **{CACHE_NAME: cache},
    )
    windows = record_windows(monkeypatch)
    token, position = prefill.logits[:, -1:].argmax(-1), positions[:, -1:] + 1
    cache.plan_decoding_step()
    decode_steps(cache, token, position, 1, model)  # planned
    decode_steps(cache, token, position + 1, 1, model)  # not planned
    cache.plan_decoding_step()
    decode_steps(cache, token, position + 2, 1, model)  # planned, without a bound
    full_window, full_unplanned, full_after = (columns for rows, columns, _ in windows if rows is cache.groups[0])
    assert full_window < cache.groups[0].capacity == full_unplanned == full_after


def decode_steps(cache, token, position, steps: int, forward):
    logits = []
    for _ in range(steps):
        out = forward(input_ids=token, position_ids=position, logits_to_keep=1, use_cache=True, **{CACHE_NAME: cache})
        logits.append(out.logits[:, -1])
        token, position = out.logits[:, -1:].argmax(-1), position + 1
    return torch.stack(logits)


@torch.no_grad()
def test_the_decoding_step_is_one_graph_without_recompiles():
    """`torch.compile(model, fullgraph=True, dynamic=False)` of the forward: a graph break (host synchronisation,
    data-dependent control flow) would raise, and a shape or host value that changes per step would recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicLlavaStaticCache(model.config, max_cache_len=input_ids.shape[1] + 8) for _ in range(2)]
    steps = []
    for cache, forward in zip(caches, (model, torch.compile(model, fullgraph=True, dynamic=False, backend="eager"))):
        prefill = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=positions,
            **{CACHE_NAME: cache},
        )
        token = prefill.logits[:, -1:].argmax(-1)
        steps.append(decode_steps(cache, token, positions[:, -1:] + 1, 6, forward))
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=FP32_SAME_MATH)  # the same tokens, hence close logits
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(caches[0].stored_lengths(), caches[1].stored_lengths())


def compile_config() -> CompileConfig:
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told so (as for Llava)
    return config


def compile_decoding_steps(model) -> list[int]:
    """Routes the model's decoding steps through `torch.compile` (inductor, one graph), its other forwards stay eager:
    what generate() does with `compile_config` for greedy search and sampling, done by hand for beam search (whose
    loop in transformers 5.23/5.24 never calls the compiled forward). Returns the count of compiled calls."""
    compiled, eager, calls = torch.compile(model.forward, fullgraph=True, dynamic=False), model.forward, [0]

    @functools.wraps(eager)  # generate() reads the forward's signature
    def forward(*args, **kwargs):
        cache, ids = kwargs.get(CACHE_NAME), kwargs.get("input_ids")
        if (
            cache is not None
            and cache.has_past
            and ids is not None
            and ids.shape[1] == 1
            and not kwargs.get("prefill")
        ):
            calls[0] += 1
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    model.forward = forward
    return calls


@pytest.mark.inductor
def test_compiled_decoding_equals_eager():
    """generate() with `compile_config`, as a transformers user asks for it, gives eager decoding's tokens (inductor):
    greedy, sampling with a seed, and per-row (a batch of one, a graph of its own)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    inputs = build_prompts(ROWS)
    compiled = {}
    for mode in ("greedy", "sample"):  # one sequence per row: the same batch size, so greedy's graph serves sampling
        options = {"cache_implementation": "static", "num_return_sequences": 1}
        eager = run(model, mode, inputs, **options)
        compiled[mode] = run(model, mode, inputs, compile_config=compile_config(), **options)
        assert_same_generation(eager, compiled[mode])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation between the two
    prompt = inputs[0].shape[1]
    for row, ids, mask, pixels in list(rows_alone(*inputs, ROWS))[:1]:
        alone = generate(model, ids, mask, pixels, cache_implementation="static", compile_config=compile_config())
        assert torch.equal(compiled["greedy"].sequences[row, prompt:], alone.sequences[0, ids.shape[1] :])
        assert (
            torch.stack(compiled["greedy"].logits)[:, row] - torch.stack(alone.logits)[:, 0]
        ).abs().max() <= FP32_SAME_MATH


@pytest.mark.inductor
def test_compiled_read_windows_share_one_graph(monkeypatch):
    """generate() with `compile_config` and windows of several sizes: one graph for all of them (the window's length
    is a dynamic dimension, even under `dynamic=False`), with eager decoding's tokens, logits and entries
    (inductor)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    inputs = build_prompts(ROWS)
    windows = record_windows(monkeypatch)
    eager = run(model, "greedy", inputs, **{CACHE_NAME: windowed_cache(model, inputs, "greedy")})
    sizes = {(full[1], sparse[1]) for full, sparse in zip(windows[::2], windows[1::2])}  # per step, both groups
    cache = windowed_cache(model, inputs, "greedy")
    compiled = run(model, "greedy", inputs, compile_config=compile_config(), **{CACHE_NAME: cache})
    assert_same_generation(eager, compiled)
    assert_same_cache(cache, eager.get(CACHE_NAME))
    assert len(sizes) > 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.inductor
def test_compiled_beam_search_equals_eager():
    torch._dynamo.reset()
    model = tiny_model()
    inputs = build_prompts(ROWS)
    eager = run(model, "beam", inputs, cache_implementation="static")
    calls = compile_decoding_steps(model)
    compiled = run(model, "beam", inputs, cache_implementation="static")
    assert calls[0] == MODES["beam"]["max_new_tokens"] - 1  # every decoding step ran compiled
    assert_same_generation(eager, compiled)
