"""`pipeline("image-text-to-text")` on a saved folder: chat, plain and batched calls, with sparsification on."""

from contextlib import contextmanager

import pytest
from tiny_checkpoint import chat, save_tiny_checkpoint, tiny_images
from transformers import pipeline

from dynamic_llava_hf import DynamicLlavaForConditionalGeneration


MAX_NEW_TOKENS = 5
KEPT_PER_IMAGE = 4  # floor(9 image tokens x vision_keep_rate 0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    save_tiny_checkpoint(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    # With the package installed its registered classes win over the folder's code; the pipeline on the folder's own
    # code, where the package is not installed, runs in test_remote_code.py's fresh virtual environment.
    return pipeline("image-text-to-text", model=folder, trust_remote_code=True)


@contextmanager
def recorded_forwards(pipe):
    """Records, for every forward of the Dynamic-LLaVA backbone during the block, the attention mask it got and what
    it pruned (kept image tokens per row; the output-text predictor's keep decisions while decoding)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append(
            {
                "attention_mask": kwargs.get("attention_mask"),
                "kept_image_token_indices": output.kept_image_token_indices,
                "output_keep_decisions": output.output_keep_decisions,
            }
        )

    handle = pipe.model.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def assert_sparsified(calls, rows: int):
    prefill, *decoding = calls
    assert len(prefill["kept_image_token_indices"]) == rows
    assert all(len(kept) == KEPT_PER_IMAGE for kept in prefill["kept_image_token_indices"])
    assert len(decoding) == MAX_NEW_TOKENS - 1
    assert all(step["output_keep_decisions"].shape == (rows, 1) for step in decoding)


def test_the_pipeline_gets_the_dynamic_llava_model_and_processor(pipe):
    assert isinstance(pipe.model, DynamicLlavaForConditionalGeneration)
    assert type(pipe.processor).__name__ == "LlavaProcessor"
    assert pipe.processor.tokenizer.padding_side == "left"


def test_chat_form_returns_the_assistant_reply(pipe):
    messages = chat("w1 w2 w3", tiny_images(1)[0])
    with recorded_forwards(pipe) as calls:
        (result,) = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)
    assert_sparsified(calls, rows=1)
    *prompt, reply = result["generated_text"]
    assert prompt == messages
    assert reply["role"] == "assistant" and isinstance(reply["content"], str) and reply["content"].strip()


def test_plain_image_and_text_form(pipe):
    image = tiny_images(2)[1]
    text = "USER: <image>\nw4 w5 ASSISTANT:"
    with recorded_forwards(pipe) as calls:
        (result,) = pipe(images=image, text=text, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert_sparsified(calls, rows=1)
    assert isinstance(result["generated_text"], str) and result["generated_text"].strip()

    (full,) = pipe(images=image, text=text, max_new_tokens=MAX_NEW_TOKENS)
    assert full["generated_text"] == text + result["generated_text"]


def test_batched_chats_equal_one_by_one(pipe):
    chats = [
        chat("w1 w2 w3", image) if index % 2 == 0 else chat("w7 w8 w9 w10 w11 w12 w13 w14", image)
        for index, image in enumerate(tiny_images(4))
    ]
    with recorded_forwards(pipe) as calls:
        batched = pipe(text=chats, batch_size=2, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    # Two batches of two rows each; the prompts differ in length, so the shorter row is left-padded.
    prefills = [call for call in calls if call["kept_image_token_indices"] is not None]
    assert len(prefills) == 2
    for prefill in prefills:
        assert len(prefill["kept_image_token_indices"]) == 2
        assert not bool(prefill["attention_mask"][0, 0]) and bool(prefill["attention_mask"][1].all())
    assert all(len(kept) == KEPT_PER_IMAGE for prefill in prefills for kept in prefill["kept_image_token_indices"])

    one_by_one = [pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False) for messages in chats]
    assert [answer[0]["generated_text"] for answer in batched] == [
        answer[0]["generated_text"] for answer in one_by_one
    ]
    assert len({answer[0]["generated_text"] for answer in batched}) > 1  # the rows are really different


def test_sparsity_override_through_generate_kwargs(pipe):
    messages = chat("w1 w2 w3", tiny_images(1)[0])
    with recorded_forwards(pipe) as calls:
        pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, generate_kwargs={"sparsity": False})
    assert all(call["kept_image_token_indices"] is None for call in calls)
    assert all(call["output_keep_decisions"] is None for call in calls)

    with recorded_forwards(pipe) as calls:
        pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, generate_kwargs={"sparsity": {"vision_keep_rate": 1 / 3}})
    assert [len(kept) for kept in calls[0]["kept_image_token_indices"]] == [3]


def test_installed_package_needs_no_trust_remote_code(folder, pipe):
    plain = pipeline("image-text-to-text", model=folder)
    assert type(plain.model) is DynamicLlavaForConditionalGeneration
    messages = chat("w1 w2 w3", tiny_images(1)[0])
    with recorded_forwards(plain) as calls:
        answer = plain(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert_sparsified(calls, rows=1)
    assert answer == pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)


def test_pipeline_answer_is_the_models_greedy_generation(folder, pipe):
    image = tiny_images(1)[0]
    inputs = pipe.processor.apply_chat_template(
        chat("w1 w2 w3", image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    sequences = pipe.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = pipe.processor.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    (answer,) = pipe(text=chat("w1 w2 w3", image), max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert answer["generated_text"].strip() == expected.strip()
