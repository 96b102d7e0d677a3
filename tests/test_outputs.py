"""Optional outputs as transformers models return them: attention weights (eager) and selected hidden states."""

import pytest
import torch

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from tiny_models import PAD_TOKEN_ID, build_prompts, llava_twin, tiny_model


ROWS = [(3, 1, 4), (1, 1, 2)]


def inputs(rows=ROWS):
    input_ids, attention_mask, pixel_values = build_prompts(rows)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


def assert_rows_sum_to_one(attentions, query_valid):
    """Each listed query's weights sum to 1; every other query's are all zero."""
    sums = attentions.sum(-1).transpose(1, 2)  # [batch, queries, heads]
    torch.testing.assert_close(sums[query_valid], torch.ones_like(sums[query_valid]))
    assert not sums[~query_valid].any()


@torch.no_grad()
def test_attentions_without_sparsification_equal_llava():
    model = tiny_model("eager")
    batch = inputs()
    llava = llava_twin(model, "eager")(**batch, output_attentions=True)
    ours = model(**batch, output_attentions=True, sparsity=False)
    assert len(ours.attentions) == len(llava.attentions) == model.config.text_config.num_hidden_layers
    valid = batch["attention_mask"].bool()  # padding queries attend differently (theirs: uniform, ours: to themselves)
    for expected, actual in zip(llava.attentions, ours.attentions):
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual.transpose(1, 2)[valid], expected.transpose(1, 2)[valid])


@torch.no_grad()
def test_generated_attentions_without_sparsification_equal_llava():
    model = tiny_model("eager")
    batch = inputs()
    kwargs = dict(
        max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True, pad_token_id=0
    )
    expected = llava_twin(model, "eager").generate(**batch, **kwargs)
    actual = model.generate(**batch, sparsity=False, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    valid = batch["attention_mask"].bool()
    for step, (expected_layers, actual_layers) in enumerate(zip(expected.attentions, actual.attentions)):
        for expected_layer, actual_layer in zip(expected_layers, actual_layers):
            assert actual_layer.shape == expected_layer.shape
            if step == 0:  # the prompt: padding queries differ
                expected_layer = expected_layer.transpose(1, 2)[valid]
                actual_layer = actual_layer.transpose(1, 2)[valid]
            torch.testing.assert_close(actual_layer, expected_layer)


@torch.no_grad()
def test_attentions_with_pruning_are_zero_at_removed_tokens():
    model = tiny_model("eager")
    batch = inputs()
    dense = model(**batch, output_attentions=True, sparsity=False).attentions
    pruned = model(**batch, output_attentions=True)
    sparse_layer = model.config.sparse_layer
    image_mask = batch["input_ids"] == model.config.image_token_id
    removed = image_mask.clone()
    for row, kept in enumerate(pruned.kept_image_token_indices):
        removed[row, image_mask[row].nonzero().flatten()[kept]] = False
    assert removed.any()
    kept_queries = batch["attention_mask"].bool() & ~removed
    for layer, attentions in enumerate(pruned.attentions):
        assert attentions.shape == dense[layer].shape
        if layer < sparse_layer:  # as in Llava
            torch.testing.assert_close(attentions, dense[layer])
            continue
        assert not attentions.permute(0, 3, 1, 2)[removed].any()  # no attention to removed keys
        assert_rows_sum_to_one(attentions, kept_queries)  # over the kept keys; removed queries are zero


@torch.no_grad()
def test_cached_decoding_attentions_skip_unstored_tokens():
    """Decoding step by step: the later layers' weights are zero at the generated tokens the output-text predictor
    did not store, and at the removed image tokens; the earlier layers see every token."""
    model = tiny_model("eager")
    batch = inputs()
    out = model(**batch, use_cache=True)
    cache, attention_mask = out[CACHE_NAME], batch["attention_mask"]
    prompt_persist = torch.ones_like(attention_mask, dtype=torch.bool)
    image_mask = batch["input_ids"] == model.config.image_token_id
    for row, kept in enumerate(out.kept_image_token_indices):
        prompt_persist[row, image_mask[row].nonzero().flatten()] = False
        prompt_persist[row, image_mask[row].nonzero().flatten()[kept]] = True
    stored = [prompt_persist & attention_mask.bool()]
    for _ in range(6):
        token = out.logits[:, -1:].argmax(-1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
        out = model(
            input_ids=token,
            attention_mask=attention_mask,
            output_attentions=True,
            use_cache=True,
            **{CACHE_NAME: cache},
        )
        stored.append(out.output_keep_decisions)
        for layer, attentions in enumerate(out.attentions):
            assert attentions.shape[-2:] == (1, attention_mask.shape[1])
            weights = attentions[:, :, 0]  # [batch, heads, keys]
            # Keys stored earlier, and the current token itself (it always attends to itself).
            readable = torch.cat([*stored[:-1], torch.ones_like(token, dtype=torch.bool)], dim=-1)
            if layer < model.config.sparse_layer:
                readable = attention_mask.bool()
            assert not weights.transpose(1, 2)[~readable].any()
            assert (weights.transpose(1, 2)[readable] > 0).all()
            torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    assert not torch.cat(stored[1:], dim=-1).all(), "the output-text predictor should drop some tokens"


@torch.no_grad()
def test_config_output_attentions_equals_the_argument():
    model = tiny_model("eager")
    batch = inputs()
    by_argument = model(**batch, output_attentions=True).attentions
    model.config.output_attentions = True
    by_config = model(**batch).attentions
    assert len(by_config) == len(by_argument)
    for expected, actual in zip(by_argument, by_config):
        torch.testing.assert_close(actual, expected)
    assert model(**batch, output_attentions=False).attentions is None


@torch.no_grad()
def test_attentions_need_eager_as_in_llava():
    model = tiny_model("sdpa")
    assert model(**inputs(), output_attentions=True).attentions == ()  # as Llava: sdpa warns and returns none


@torch.no_grad()
@pytest.mark.parametrize("selection", [[0, 2, -1], 3, [-2]])
def test_output_hidden_states_selects_layers(selection):
    model = tiny_model()
    batch = inputs()
    every = model(**batch, output_hidden_states=True).hidden_states
    selected = model(**batch, output_hidden_states=selection).hidden_states
    count = model.config.text_config.num_hidden_layers + 1
    indices = {index % count for index in ([selection] if isinstance(selection, int) else selection)}
    assert len(selected) == len(every) == count
    for index, (expected, actual) in enumerate(zip(every, selected)):
        if index in indices:
            torch.testing.assert_close(actual, expected)
        else:
            assert actual is None


@torch.no_grad()
def test_generate_with_selected_hidden_states():
    model = tiny_model()
    batch = inputs()
    out = model.generate(
        **batch, max_new_tokens=2, output_hidden_states=[-1], return_dict_in_generate=True, pad_token_id=PAD_TOKEN_ID
    )
    for step in out.hidden_states:
        assert all(state is None for state in step[:-1]) and step[-1] is not None
