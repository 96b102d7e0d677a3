"""LLaVA-format training data and `examples/train.py` end to end on a tiny checkpoint."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import IMAGE_SIZE, IMAGE_TOKEN_ID, tiny_model

PIL = pytest.importorskip("PIL.Image")

from dynamic_llava_hf.processing import build_processor

from dynamic_llava_hf.train.data import LlavaConversationDataset, LlavaDataCollator, to_chat_messages

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORDS = [
    "A",
    "chat",
    "between",
    "a",
    "curious",
    "user",
    "and",
    "an",
    "artificial",
    "intelligence",
    "assistant",
    ".",
    "The",
    "gives",
    "helpful",
    ",",
    "detailed",
    "polite",
    "answers",
    "to",
    "the",
    "'",
    "s",
    "questions",
    "USER",
    ":",
    "ASSISTANT",
    "what",
    "is",
    "in",
    "image",
    "it",
    "cat",
    "dog",
    "red",
    "blue",
    "big",
    "small",
    "color",
    "yes",
    "no",
    "?",
]


def tiny_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) < IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    # The tiny model's vocabulary puts the image token at 99: fill the ids below it first.
    tokenizer.add_tokens([f"<unused{i}>" for i in range(IMAGE_TOKEN_ID - len(vocab))])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return build_processor(tokenizer, image_size=IMAGE_SIZE, patch_size=14)


CONVERSATIONS = [
    [("human", "<image>\nwhat is in the image ?"), ("gpt", "a big red cat .")],
    [
        ("human", "what color is it ?\n<image>"),
        ("gpt", "blue"),
        ("human", "is it big ?"),
        ("gpt", "no , it is small ."),
    ],
    [("human", "<image>\nis it a dog ?"), ("gpt", "yes , a small dog .")],
]


def write_dataset(folder: Path) -> Path:
    records = []
    for index, turns in enumerate(CONVERSATIONS):
        image = f"image{index}.png"
        PIL.new("RGB", (IMAGE_SIZE + 10 * index, IMAGE_SIZE), (40 * index, 100, 200)).save(folder / image)
        records.append(
            {"id": str(index), "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}
        )
    records.append(
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "no"}]}
    )
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_labels_cover_exactly_the_assistant_replies(tmp_path):
    processor = tiny_processor()
    dataset = LlavaConversationDataset(str(write_dataset(tmp_path)), str(tmp_path), processor)
    assert len(dataset) == 3  # the text-only record is left out (requires_image)
    assert dataset.num_image_tokens == 9

    sample = dataset[1]
    tokenizer = processor.tokenizer
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert ids.count(IMAGE_TOKEN_ID) == 9 and sample["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    supervised = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
    assert supervised.split() == ["blue", "</s>", "no", ",", "it", "is", "small", ".", "</s>"]
    # The unsupervised part is the vicuna_v1 prompt of both turns.
    text = tokenizer.decode([i for i in ids if i != IMAGE_TOKEN_ID])
    assert "USER : what color is it ?" in text and text.count("ASSISTANT :") == 2
    assert ids[0] == tokenizer.bos_token_id

    batch = LlavaDataCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    shorter = int(batch["attention_mask"][0].sum())
    assert (batch["labels"][0, shorter:] == -100).all() and (batch["input_ids"][0, shorter:] == 3).all()


def test_conversation_errors_are_clear():
    with pytest.raises(ValueError, match="Unknown conversation role"):
        to_chat_messages([{"from": "robot", "value": "x"}])
    with pytest.raises(ValueError, match="must end with an assistant reply"):
        to_chat_messages([{"from": "human", "value": "x"}])


def test_train_example_runs_the_recipe_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    model_dir, output_dir = tmp_path / "model", tmp_path / "out"
    model = tiny_model()
    model.save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    data = write_dataset(tmp_path)
    before = model.model.image_score_predictor.output_mlp[-1].weight.clone()

    argv = [
        "--model_name_or_path", str(model_dir), "--data_path", str(data), "--image_folder", str(tmp_path),
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--output_text_len_for_training", "2", "--vision_keep_rate", "0.5", "--use_cpu", "True", "--bf16", "False",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    runpy.run_path(str(EXAMPLES / "train.py"), run_name="__main__")

    trained = type(model).from_pretrained(output_dir)
    assert trained.config.vision_keep_rate == 0.5
    assert not torch.equal(trained.model.image_score_predictor.output_mlp[-1].weight, before)
    assert (output_dir / "processor_config.json").exists() or (output_dir / "preprocessor_config.json").exists()
