"""`train/data.py`: LLaVA conversation records -> chat messages -> token ids and labels -> padded batches."""

import pytest
import torch
from test_train_example import IMAGE_TOKEN_ID, tiny_processor

from dynamic_llava_hf.train.data import IGNORE_INDEX, LlavaDataCollator, to_chat_messages, tokenize_conversation


def test_chat_messages_map_roles_and_turn_the_placeholder_into_an_image_item():
    messages = to_chat_messages(
        [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "user", "value": "Sure?"},
            {"from": "assistant", "value": "Yes."},
        ]
    )
    assert [message["role"] for message in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert messages[1]["content"] == [{"type": "text", "text": "A cat."}]


def test_collator_right_pads_ids_labels_and_mask():
    samples = [
        {
            "input_ids": torch.tensor([5, 6, 7]),
            "labels": torch.tensor([-100, 6, 7]),
            "pixel_values": torch.zeros(3, 2, 2),
        },
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": torch.ones(3, 2, 2)},
    ]
    pad = 0
    batch = LlavaDataCollator(pad_token_id=pad)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["pixel_values"][1].eq(1).all()


def test_collator_leaves_out_pixel_values_for_text_only_batches():
    batch = LlavaDataCollator(pad_token_id=0)([{"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}])
    assert "pixel_values" not in batch


def test_long_conversations_are_cut_after_the_image_never_through_it():
    processor = tiny_processor()
    image_tokens = 9  # the tiny processor's 42 px image: 3 x 3 patches of 14 px
    messages = to_chat_messages(
        [{"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a big red cat ."}]
    )
    input_ids, labels = tokenize_conversation(messages, processor, image_tokens, max_length=1000)
    assert input_ids.count(IMAGE_TOKEN_ID) == image_tokens and len(input_ids) == len(labels)

    end_of_image = input_ids.index(IMAGE_TOKEN_ID) + image_tokens
    cut_ids, cut_labels = tokenize_conversation(messages, processor, image_tokens, max_length=end_of_image + 1)
    assert (cut_ids, cut_labels) == (input_ids[: end_of_image + 1], labels[: end_of_image + 1])
    with pytest.raises(ValueError, match="would cut through the image tokens"):
        tokenize_conversation(messages, processor, image_tokens, max_length=end_of_image - 1)
