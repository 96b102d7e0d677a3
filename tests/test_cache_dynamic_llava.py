"""DynamicLlavaCache driven through its step protocol directly (begin_step, the layers' update, end_step), no model."""

import pytest
import torch

from dynamic_llava_hf.cache_dynamic_llava import (
    FULL_GROUP,
    SPARSE_GROUP,
    DynamicLlavaCache,
    DynamicLlavaLayer,
    KeyLayout,
)


NUM_LAYERS, SPARSE_LAYER = 3, 1  # layer 0 is the full group, layers 1 and 2 the sparse group
HEADS, HEAD_DIM = 2, 4


def new_cache() -> DynamicLlavaCache:
    return DynamicLlavaCache(num_hidden_layers=NUM_LAYERS, sparse_layer=SPARSE_LAYER)


def token_states(values: torch.Tensor) -> torch.Tensor:
    """`[batch, new]` ids -> `[batch, heads, new, head_dim]` states holding the id, so stored slots are readable."""
    return values.float()[:, None, :, None].expand(-1, HEADS, -1, HEAD_DIM).contiguous()


def step(cache, ids: torch.Tensor, persist_full: torch.Tensor, persist_sparse: torch.Tensor):
    """One forward: both groups planned, every layer updated with `ids`; returns the layouts and what layer 0 and the
    last layer attended to (their keys' first channel)."""
    layouts = (cache.begin_step(FULL_GROUP, persist_full), cache.begin_step(SPARSE_GROUP, persist_sparse))
    attended = []
    for layer in range(NUM_LAYERS):
        keys, _ = cache.update(token_states(ids), token_states(ids), layer)
        attended.append(keys[:, 0, :, 0])
    cache.end_step(ids.shape[1])
    return layouts, attended


def stored(cache, layer: int, row: int) -> list[int]:
    length = int(cache.stored_lengths()[layer, row])
    return cache.layers[layer].keys[row, 0, :length, 0].long().tolist()


def test_prefill_then_in_place_decoding_keeps_only_persisted_tokens():
    cache = new_cache()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])  # row 0 is left-padded
    kept = valid & torch.tensor([[True, True, False, True], [True, False, True, True]])
    (full, sparse), attended = step(cache, ids, valid, kept)

    # An empty cache: the new tokens are all the keys there are.
    assert full.past_width == 0 and not full.in_place and sparse.past_width == 0
    assert torch.equal(attended[0], ids.float())
    assert cache.get_seq_length() == 4  # original tokens seen, padding included (what generate() expects)
    assert cache.stored_lengths().tolist() == [[3, 4], [2, 3], [2, 3]]
    assert stored(cache, 0, 0) == [2, 3, 4] and stored(cache, 2, 0) == [2, 4] and stored(cache, 2, 1) == [5, 7, 8]

    # One new token per row: written in place behind each row's entries; kept in row 1 only.
    (full, sparse), attended = step(
        cache, torch.tensor([[9], [10]]), torch.ones(2, 1, dtype=torch.bool), torch.tensor([[False], [True]])
    )
    assert full.in_place and sparse.in_place
    assert full.lengths.tolist() == [3, 4] and full.past_width == 4 and not full.uniform
    assert sparse.lengths.tolist() == [2, 3] and sparse.past_width == 3
    # The last layer read the buffer up to past_width + 1: row 0's new token sits at its slot 2.
    assert attended[-1].shape == (2, 4) and attended[-1][0, 2] == 9 and attended[-1][1, 3] == 10
    assert cache.stored_lengths().tolist() == [[4, 5], [2, 4], [2, 4]]
    assert stored(cache, 2, 0) == [2, 4] and stored(cache, 2, 1) == [5, 7, 8, 10]
    assert cache.get_seq_length() == 5


def test_several_new_tokens_are_concatenated_and_stored_compacted():
    cache = new_cache()
    step(cache, torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[True, False]]))
    # A later turn of three tokens: attention reads cat(stored, new); only persisted tokens stay, in order.
    (full, sparse), attended = step(
        cache, torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[False, True, True]])
    )
    assert not full.in_place and not sparse.in_place
    assert attended[0].tolist() == [[1, 2, 3, 4, 5]] and attended[-1].tolist() == [[1, 3, 4, 5]]
    assert stored(cache, 0, 0) == [1, 2, 3, 4, 5] and stored(cache, 1, 0) == [1, 4, 5]


def test_storage_grows_geometrically():
    cache = new_cache()
    step(cache, torch.arange(1, 5)[None], torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool))
    first_capacity = cache.layers[0].capacity
    assert first_capacity >= 64  # the smallest allocation
    for token in range(5, 5 + 2 * first_capacity):
        ones = torch.ones(1, 1, dtype=torch.bool)
        step(cache, torch.tensor([[token]]), ones, ones)
    # 4 + 2 x 64 entries with x1.25 growth (64 -> 81 -> 102 -> 128 -> 161): four reallocations per layer, not one
    # per step.
    assert all(layer.growth_events == 4 for layer in cache.layers)
    assert all(layer.capacity == 161 for layer in cache.layers)
    assert stored(cache, 0, 0) == list(range(1, 5 + 2 * first_capacity))


def test_storage_grows_no_further_than_the_expected_tokens():
    """`expected_tokens` (generate() sets prompt + new tokens) caps growth while it suffices; past it, the cache
    still stores everything and grows geometrically again."""
    cache = new_cache()
    cache.expected_tokens = 90
    ones = torch.ones(1, 1, dtype=torch.bool)
    step(cache, torch.arange(1, 5)[None], torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool))
    for token in range(5, 91):
        step(cache, torch.tensor([[token]]), ones, ones)
    assert all(layer.capacity == 90 for layer in cache.layers)  # 64 -> 81 -> 90, not 102
    assert cache.groups[0].positions.shape[1] == 90
    step(cache, torch.tensor([[91]]), ones, ones)
    assert all(layer.capacity == 91 + 91 // 4 for layer in cache.layers)
    assert stored(cache, 0, 0) == list(range(1, 92))


def test_a_prefill_storing_everything_is_a_block_copy_and_leaves_the_headroom_alone():
    cache = new_cache()
    everything = torch.ones(2, 5, dtype=torch.bool)
    cache.begin_step(FULL_GROUP, everything)
    cache.begin_step(SPARSE_GROUP, everything & torch.tensor([[True], [False]]))
    # Write slots are planned once per group: none for a block copy, a scatter index where a row drops tokens.
    assert cache.groups[FULL_GROUP].plan.slots is None
    assert cache.groups[SPARSE_GROUP].plan.slots.shape == (2, 1, 5, 1)
    ids = torch.arange(1, 11).view(2, 5)
    for layer in range(NUM_LAYERS):
        cache.update(token_states(ids), token_states(ids), layer)
    cache.end_step(5)
    assert stored(cache, 0, 1) == [6, 7, 8, 9, 10] and stored(cache, 2, 0) == [1, 2, 3, 4, 5]
    # Only the written columns count as initialised (plus a zeroed block ahead where a scatter left rows ragged).
    assert cache.layers[0].capacity >= 64 and cache.layers[0].finite_width == 5
    assert cache.layers[2].finite_width == min(5 + 64, cache.layers[2].capacity)


def test_room_is_zeroed_before_attention_reads_it(monkeypatch):
    """Buffers grow uninitialised. Attention reads a ragged row's unused columns too (masked, but a NaN there would
    poison the softmax), so everything it reads must have been written or zeroed: all new room is filled with NaN
    here to prove it."""
    grow = DynamicLlavaLayer._ensure_capacity

    def poisoned(layer, needed):
        grow(layer, needed)
        layer.key_buffer[:, :, layer.finite_width :] = float("nan")
        layer.value_buffer[:, :, layer.finite_width :] = float("nan")

    monkeypatch.setattr(DynamicLlavaLayer, "_ensure_capacity", poisoned)
    cache = new_cache()
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    kept = valid & torch.tensor([[True, False, True, True], [True, True, True, True]])
    _, attended = step(cache, torch.arange(1, 9).view(2, 4), valid, kept)
    assert all(torch.isfinite(keys).all() for keys in attended)
    for token in range(9, 160):  # past two reallocations; row 0 keeps a third of its tokens, row 1 all
        ones = torch.ones(2, 1, dtype=torch.bool)
        persist = torch.tensor([[token % 3 == 0], [True]])
        _, attended = step(cache, torch.tensor([[token], [1000 + token]]), ones, persist)
        assert all(torch.isfinite(keys).all() for keys in attended), token
    assert stored(cache, 2, 0) == [3, 4] + list(range(9, 160, 3))
    assert stored(cache, 2, 1) == [5, 6, 7, 8] + [1000 + t for t in range(9, 160)]


def test_beam_reorder_and_batch_helpers_move_every_row_together():
    cache = new_cache()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    everything = torch.ones(2, 3, dtype=torch.bool)
    step(cache, ids, everything, torch.tensor([[True, False, False], [True, True, True]]))
    step(cache, torch.tensor([[7], [8]]), torch.ones(2, 1, dtype=torch.bool), torch.tensor([[True], [False]]))
    report = cache.sparsity_report()  # no image tokens were recorded; the stored bytes still differ per row
    assert report[0]["stored_kv_bytes"] != report[1]["stored_kv_bytes"]

    cache.reorder_cache(torch.tensor([1, 1]))  # beam search keeps two copies of row 1
    assert cache.stored_lengths().tolist() == [[4, 4], [3, 3], [3, 3]]
    assert stored(cache, 2, 0) == stored(cache, 2, 1) == [4, 5, 6]
    # The host-side extrema follow the rows: the next step's layout is uniform again.
    layout = cache.begin_step(SPARSE_GROUP, torch.ones(2, 1, dtype=torch.bool))
    assert layout.uniform and layout.past_width == 3

    cache = new_cache()
    step(cache, ids, everything, torch.tensor([[True, False, False], [True, True, True]]))
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and cache.stored_lengths()[SPARSE_LAYER].tolist() == [1, 1, 3, 3]
    cache.batch_select_indices(torch.tensor([3, 0]))
    assert cache.stored_lengths()[SPARSE_LAYER].tolist() == [3, 1]


def test_protocol_errors_are_clear():
    cache = new_cache()
    with pytest.raises(RuntimeError, match="begin_step"):
        cache.update(token_states(torch.ones(1, 1)), token_states(torch.ones(1, 1)), 0)
    cache = new_cache()
    step(cache, torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="holds 2 rows"):
        cache.begin_step(FULL_GROUP, torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="negative"):
        cache.crop(1)


def test_empty_layout_is_the_layout_without_a_cache():
    assert KeyLayout.empty() == KeyLayout(lengths=None, past_width=0, in_place=False, uniform=True)


def test_public_keys_and_values_show_stored_entries_not_the_buffer():
    cache = new_cache()
    ids = torch.arange(1, 24)[None].expand(2, -1)  # 23 tokens per row
    keep_row_0 = torch.ones(2, 23, dtype=torch.bool)
    keep_row_0[0, ::2] = False  # row 0 stores 11 entries in the sparse group, row 1 all 23
    step(cache, ids, torch.ones(2, 23, dtype=torch.bool), keep_row_0)
    assert cache.layers[0].capacity >= 64  # preallocated room to grow...
    for layer, longest in ((0, 23), (1, 23), (2, 23)):
        # ...but the public view is [batch, heads, longest row's stored length, head_dim]
        assert cache.layers[layer].keys.shape == (2, HEADS, longest, HEAD_DIM)
        assert cache.layers[layer].values.shape == (2, HEADS, longest, HEAD_DIM)
    step(cache, ids, torch.ones(2, 23, dtype=torch.bool), torch.zeros(2, 23, dtype=torch.bool))
    assert cache.layers[0].keys.shape[2] == 46 and cache.layers[2].keys.shape[2] == 23
    assert stored(cache, 2, 0) == list(range(2, 24, 2))
