"""The flash_attention_2 path on CPU, checked against sdpa.

flash-attn only runs on CUDA, so the model's flash path (the 2D key masks of `build_attention_mask`, unpadded by
transformers) would otherwise go untested here. These tests run transformers' real flash-attention glue
(`integrations/flash_attention.py`, `_flash_attention_forward`, `_upad_input`, `_pad_input`, the kwargs processing)
and replace only the two CUDA kernels by float32 reference implementations with flash-attn 2 semantics. Each test
runs as `flash_attention_2` and as a Hub kernel (`kernels-community/flash-attn2`, registered the way transformers
registers it once downloaded: its repo name, transformers' flash glue, flash attention's mask).
"""

import copy

import pytest
import torch
import transformers.integrations.flash_attention as flash_integration
import transformers.modeling_flash_attention_utils as flash_utils
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from mask_reference import generation_positions
from tiny_models import VOCAB_SIZE, build_prompts, tiny_model
from tolerances import FP32_SAME_OP


# Three left-padded rows whose image sits at different positions.
MIXED_ROWS = [(3, 1, 5), (8, 1, 2), (1, 1, 1)]
# The emulated flash kernel vs SDPA/eager: float32, but attention accumulated per block in another order.
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Reference kernels


def reference_attention(q, k, v, softmax_scale, causal, window_size, softcap):
    """One sequence: `q [lq, H, D]`, `k`/`v` `[lk, Hk, D]` -> `[lq, H, D]`, computed in float32.

    As in flash-attn >= 2.1, the causal mask is aligned to the bottom right: query `i` sits at key position
    `i + lk - lq`. Query rows that see no key give zeros.
    """
    lq, num_heads, head_dim = q.shape
    lk, num_kv_heads = k.shape[:2]
    if num_heads % num_kv_heads:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    # GQA: query head h reads kv head h // (H / Hk).
    k = k.float().repeat_interleave(num_heads // num_kv_heads, dim=1)
    v = v.float().repeat_interleave(num_heads // num_kv_heads, dim=1)
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    diagonal = torch.arange(lq)[:, None] + lk - lq
    columns = torch.arange(lk)[None, :]
    left, right = window_size
    if causal:
        right = 0
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if right >= 0:
        allowed &= columns <= diagonal + right
    if left >= 0:
        allowed &= columns >= diagonal - left
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


class ReferenceFlashKernels:
    """`flash_attn_func` and `flash_attn_varlen_func` of flash-attn 2 (same signatures), recording their calls."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _check_unsupported(dropout_p, alibi_slopes, return_attn_probs):
        # Dropout is random and the model runs in eval mode; the other two are never requested by transformers.
        if dropout_p or alibi_slopes is not None or return_attn_probs:
            raise NotImplementedError("dropout, alibi and attention probabilities are not emulated")

    def flash_attn_func(
        self,
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
    ):
        """`[B, S, H, D]` inputs, no padding."""
        self._check_unsupported(dropout_p, alibi_slopes, return_attn_probs)
        assert q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0] and k.shape == v.shape
        self.calls.append({"kernel": "dense", "q_shape": tuple(q.shape), "k_shape": tuple(k.shape), "causal": causal})
        return torch.stack(
            [
                reference_attention(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap)
                for b in range(q.shape[0])
            ]
        )

    def flash_attn_varlen_func(
        self,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        block_table=None,
    ):
        """Flattened `[total, H, D]` inputs; sequence `b` is rows `cu_seqlens[b]:cu_seqlens[b + 1]`."""
        self._check_unsupported(dropout_p, alibi_slopes, return_attn_probs)
        if block_table is not None:
            raise NotImplementedError("paged attention is not emulated")
        # The real kernel's input contract.
        assert q.dim() == k.dim() == v.dim() == 3 and k.shape == v.shape
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.dim() == 1
        assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
        lengths_q, lengths_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
        assert max(lengths_q) <= max_seqlen_q and max(lengths_k) <= max_seqlen_k
        self.calls.append({"kernel": "varlen", "lengths_q": lengths_q, "lengths_k": lengths_k, "causal": causal})

        out = torch.zeros_like(q)
        for b in range(len(lengths_q)):
            sq = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            sk = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
            out[sq] = reference_attention(q[sq], k[sk], v[sk], softmax_scale, causal, window_size, softcap)
        return out

    def varlen_calls(self):
        return [call for call in self.calls if call["kernel"] == "varlen"]


@pytest.fixture(params=["flash_attention_2", "kernels-community/flash-attn2"])
def implementation(request, monkeypatch):
    """The attention implementation's name; a Hub kernel's is registered as `load_and_register_attn_kernel` does."""
    if request.param.startswith("kernels-community/"):
        flash_forward, flash_mask = (
            ALL_ATTENTION_FUNCTIONS["flash_attention_2"],
            ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"],
        )
        monkeypatch.setitem(type(ALL_ATTENTION_FUNCTIONS)._global_mapping, request.param, flash_forward)
        monkeypatch.setitem(type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping, request.param, flash_mask)
    return request.param


@pytest.fixture
def flash_kernels(implementation, monkeypatch):
    """Makes transformers load the reference kernels as the flash implementation `implementation`."""
    kernels = ReferenceFlashKernels()

    def lazy_imports(name, attention_wrapper=None, allow_all_kernels=False):
        assert name == implementation, name
        # What `from flash_attn import ...` gives; flash_attn.bert_padding's pad/unpad equal transformers' own. The
        # paged kernel (flash_attn_with_kvcache) is only used by continuous batching.
        pad, unpad = flash_utils._pad_input, flash_utils._unpad_input
        return kernels.flash_attn_func, kernels.flash_attn_varlen_func, None, pad, unpad

    # Forget any loaded implementation so that `lazy_import_flash_attention` runs its real loading code (including the
    # signature-based kwargs filter) on our kernels; monkeypatch restores the module state afterwards.
    for name in (
        "_loaded_implementation",
        "_flash_fn",
        "_flash_varlen_fn",
        "_flash_with_kvcache_fn",
        "_pad_fn",
        "_unpad_fn",
        "_process_flash_kwargs_fn",
        "_process_with_kvcache_kwargs_fn",
    ):
        monkeypatch.setattr(flash_utils, name, None)
    monkeypatch.setattr(flash_utils, "_lazy_imports", lazy_imports)
    # Computed at import from the installed packages; flash-attn >= 2.1 aligns the causal mask bottom-right.
    monkeypatch.setattr(flash_integration, "_use_top_left_mask", False)
    return kernels


@pytest.fixture
def models(implementation, flash_kernels, monkeypatch):
    """(sdpa model, the same weights on the flash implementation)."""
    sdpa = tiny_model("sdpa")
    flash = copy.deepcopy(sdpa)
    # What `from_pretrained(attn_implementation=implementation)` sets, minus its check that the kernels are
    # installed: every (sub-)config, so the vision tower runs on the dense kernel and the decoder on the glue.
    for config in (flash.config, flash.config.text_config, flash.config.vision_config):
        monkeypatch.setattr(config, "_attn_implementation_internal", implementation)
    assert flash.model.language_model.layers[0].self_attn.config._attn_implementation == implementation
    return sdpa, flash


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_reference_kernels_match_sdpa():
    # The kernels' own contract, against torch's sdpa: GQA and a bottom-right aligned causal mask.
    kernels = ReferenceFlashKernels()
    generator = torch.Generator().manual_seed(0)
    lengths_q, lengths_k = [3, 1, 5], [7, 4, 5]
    q = torch.randn(sum(lengths_q), 4, 8, generator=generator)
    k, v = torch.randn(2, sum(lengths_k), 2, 8, generator=generator)
    cu_seqlens_q, cu_seqlens_k = (torch.tensor([0, *lengths]).cumsum(0).int() for lengths in (lengths_q, lengths_k))
    out = kernels.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, 5, 7, causal=True)
    for b, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        sq, sk = slice(cu_seqlens_q[b], cu_seqlens_q[b + 1]), slice(cu_seqlens_k[b], cu_seqlens_k[b + 1])
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[sq].transpose(0, 1), k[sk].transpose(0, 1), v[sk].transpose(0, 1), attn_mask=mask, enable_gqa=True
        )
        assert max_diff(out[sq], expected.transpose(0, 1)) <= FP32_SAME_OP

    # Dense kernel: 2 queries against 6 keys.
    q = torch.randn(2, 2, 4, 8, generator=generator)
    k, v = torch.randn(2, 2, 6, 2, 8, generator=generator)
    out = kernels.flash_attn_func(q, k, v, causal=True)
    mask = torch.ones(2, 6, dtype=torch.bool).tril(diagonal=4)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
    assert max_diff(out, expected.transpose(1, 2)) <= FP32_SAME_OP


@pytest.mark.parametrize("sparsity", [None, False], ids=["sparse", "dense"])
def test_prefill_matches_sdpa(models, flash_kernels, sparsity):
    sdpa, flash = models
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        position_ids=generation_positions(attention_mask),
        sparsity=sparsity,
    )
    with torch.no_grad():
        expected = sdpa(**inputs)
        actual = flash(**inputs)

    valid = attention_mask.bool()
    assert max_diff(actual.logits[valid], expected.logits[valid]) <= TOLERANCE
    assert torch.equal(actual.get(CACHE_NAME).stored_lengths(), expected.get(CACHE_NAME).stored_lengths())

    # Every decoder layer unpadded its left-padded rows (one varlen call each); the vision tower used the dense kernel.
    varlen = flash_kernels.varlen_calls()
    assert len(varlen) == flash.config.text_config.num_hidden_layers
    assert all(call["causal"] and call["lengths_q"] == call["lengths_k"] for call in varlen)
    assert varlen[0]["lengths_k"] == attention_mask.sum(-1).tolist()
    dense = [call for call in flash_kernels.calls if call["kernel"] == "dense"]
    assert dense and not any(call["causal"] for call in dense)
    if sparsity is None:
        # From sparse_layer on, the rows are the kept tokens only (gathered to the left, so right-padded).
        kept = [len(indices) for indices in expected.kept_image_token_indices]
        pruned = [total - 9 + k for total, k in zip(varlen[0]["lengths_k"], kept)]
        assert varlen[-1]["lengths_k"] == pruned
        assert [len(i) for i in actual.kept_image_token_indices] == kept


def chat(model, rows):
    """A greedy answer to the prompts of `rows`, then a second turn on the returned cache.

    The second turn feeds the last generated token (generate never feeds it) and 4 new tokens per row: several
    queries per row against a past whose length differs per row and per layer group.
    """
    input_ids, attention_mask, pixel_values = build_prompts(rows)
    with torch.no_grad():
        answer = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=12,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        cache = copy.deepcopy(answer.get(CACHE_NAME))  # keep the answer's cache as generate returned it
        assert cache.get_seq_length() == answer.sequences.shape[1] - 1
        new_tokens = torch.randint(3, VOCAB_SIZE - 2, (len(rows), 4), generator=torch.Generator().manual_seed(1))
        turn_ids = torch.cat([answer.sequences[:, -1:], new_tokens], dim=-1)
        answered = answer.sequences.shape[1] - input_ids.shape[1]
        full_mask = torch.cat([attention_mask, torch.ones(len(rows), answered + 4, dtype=torch.long)], dim=-1)
        # Each row continues from its own last position.
        positions = (full_mask.cumsum(-1) - 1)[:, -turn_ids.shape[1] :]
        turn = model(input_ids=turn_ids, attention_mask=full_mask, cache=cache, position_ids=positions)
    return answer, turn


def assert_chats_match(actual, expected):
    (answer, turn), (expected_answer, expected_turn) = actual, expected
    assert torch.equal(answer.sequences, expected_answer.sequences)
    assert len(answer.logits) == len(expected_answer.logits) > 1
    assert max(max_diff(a, e) for a, e in zip(answer.logits, expected_answer.logits)) <= TOLERANCE
    assert torch.equal(answer.get(CACHE_NAME).stored_lengths(), expected_answer.get(CACHE_NAME).stored_lengths())
    assert max_diff(turn.logits, expected_turn.logits) <= TOLERANCE
    assert torch.equal(turn.get(CACHE_NAME).stored_lengths(), expected_turn.get(CACHE_NAME).stored_lengths())


def test_generation_and_next_turn_match_sdpa(models, flash_kernels):
    sdpa, flash = models
    expected = chat(sdpa, MIXED_ROWS)
    actual = chat(flash, MIXED_ROWS)
    assert_chats_match(actual, expected)

    stored = expected[0].get(CACHE_NAME).stored_lengths()
    # The output-text predictor made the sparse layers' rows ragged beyond the prompt padding.
    assert len(set(stored[-1].tolist())) > 1
    varlen = flash_kernels.varlen_calls()
    # Decoding: one query per row against that row's own stored entries, on the varlen kernel.
    decode = [call for call in varlen if call["lengths_q"] == [1] * len(MIXED_ROWS)]
    decode_steps = len(expected[0].logits) - 1  # the first token comes from the prefill
    assert len(decode) == decode_steps * flash.config.text_config.num_hidden_layers
    assert all(len(set(call["lengths_k"])) > 1 for call in decode)
    # Second turn: 5 queries per row, bottom-right aligned to each row's stored entries.
    turn = [call for call in varlen if call["lengths_q"] == [5] * len(MIXED_ROWS)]
    assert [call["lengths_k"] for call in turn] == (stored + 5).tolist()


def test_unpadded_batch_matches_sdpa_on_the_dense_kernel(models, flash_kernels):
    # Rows of equal length: whenever a layer group's rows are uniform the model passes no mask and transformers calls
    # the dense kernel, also with fewer queries than keys (decoding, second turn).
    sdpa, flash = models
    rows = [(4, 1, 3), (4, 1, 3)]
    assert_chats_match(chat(flash, rows), chat(sdpa, rows))

    causal = [call for call in flash_kernels.calls if call["kernel"] == "dense" and call["causal"]]
    query_key_lengths = {(call["q_shape"][1], call["k_shape"][1]) for call in causal}
    assert any(q == 1 < k for q, k in query_key_lengths)  # decoding
    assert any(q == 5 < k for q, k in query_key_lengths)  # second turn
    assert flash_kernels.varlen_calls()  # the sparse layers' rows diverge once the output-text predictor drops tokens
