"""LLaVA-format conversation data for fine-tuning (the official `llava_v1_5_mix665k.json` layout).

Each record: `{"image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ"},
{"from": "gpt", "value": "A"}, ...]}`. The prompt is rendered with the processor's chat template (vicuna_v1 for
converted checkpoints), and only the assistant replies (with their end-of-sequence token) are supervised, as in
LLaVA's `preprocess_v1`.
"""

import json
import os

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from ..training_dynamic_llava import IGNORE_INDEX

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_chat_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns → transformers chat messages; the `<image>` placeholder becomes an image content item."""
    messages = []
    for turn in conversations:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"Unknown conversation role {turn.get('from')!r}; expected one of {sorted(ROLES)}")
        text = turn["value"]
        content = []
        if "<image>" in text:
            content.append({"type": "image"})
            text = text.replace("<image>", "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("A training conversation must end with an assistant reply")
    return messages


def tokenize_conversation(
    messages: list[dict], processor, num_image_tokens: int, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a whole conversation; labels are IGNORE_INDEX except on the assistant replies.

    The text is rendered piece by piece with the chat template (prompt up to each reply, then the reply), so the
    supervised span is exactly what the template puts after "ASSISTANT:".
    """
    tokenizer = processor.tokenizer
    image_tokens = processor.image_token * num_image_tokens

    def render(prefix: list[dict], generation_prompt: bool) -> str:
        if not prefix:
            return ""
        text = processor.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
        return text.replace(processor.image_token, image_tokens)

    input_ids, labels, rendered = [], [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], generation_prompt=True)
        reply = render(messages[: index + 1], generation_prompt=False)
        if not prompt.startswith(rendered) or not reply.startswith(prompt):
            raise ValueError("The chat template does not render conversations prefix by prefix; cannot find replies")
        prompt_ids = tokenizer(prompt[len(rendered) :], add_special_tokens=False).input_ids
        reply_ids = tokenizer(reply[len(prompt) :], add_special_tokens=False).input_ids
        input_ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + reply_ids
        rendered = reply
    if tokenizer.bos_token_id is not None and (not input_ids or input_ids[0] != tokenizer.bos_token_id):
        input_ids, labels = [tokenizer.bos_token_id] + input_ids, [IGNORE_INDEX] + labels
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    if len(input_ids) > max_length and image_token_id in input_ids[max_length:]:
        raise ValueError(f"model_max_length={max_length} would cut through the image tokens of a sample")
    return input_ids[:max_length], labels[:max_length]


class LlavaConversationDataset(torch.utils.data.Dataset):
    """Samples of a LLaVA-format JSON file: `input_ids`, `labels` and `pixel_values` per conversation.

    With `requires_image` (the official default) text-only records are left out of the dataset, rather than
    walked past at indexing time as the official loader does (which over-samples some records).
    """

    def __init__(
        self, data_path: str, image_folder: str, processor, model_max_length: int = 2048, requires_image: bool = True
    ):
        with open(data_path) as file:
            records = json.load(file)
        if not isinstance(records, list):
            raise ValueError(f"{data_path} must hold a JSON list of conversation records")
        self.records = [record for record in records if "image" in record or not requires_image]
        if not self.records:
            raise ValueError(f"{data_path} has no usable records (requires_image={requires_image})")
        self.image_folder = image_folder
        self.processor = processor
        self.model_max_length = model_max_length
        size = processor.image_processor.crop_size
        probe = processor(text=processor.image_token, images=Image.new("RGB", (size["width"], size["height"])))
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.num_image_tokens = int((torch.as_tensor(probe["input_ids"]) == image_token_id).sum())

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        messages = to_chat_messages(record["conversations"])
        num_placeholders = sum(item["type"] == "image" for m in messages for item in m["content"])
        has_image = "image" in record
        if num_placeholders != int(has_image):
            raise ValueError(
                f"Record {record.get('id', index)} has {num_placeholders} <image> placeholders but "
                f"{int(has_image)} image(s)"
            )
        input_ids, labels = tokenize_conversation(
            messages, self.processor, self.num_image_tokens, self.model_max_length
        )
        sample = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        if has_image:
            image = Image.open(os.path.join(self.image_folder, record["image"])).convert("RGB")
            sample["pixel_values"] = self.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
        return sample


class LlavaDataCollator:
    """Right-pads a list of samples into a batch (training uses right padding, as the official code)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict:
        input_ids = [sample["input_ids"] for sample in samples]
        batch = {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True),
            "labels": pad_sequence(
                [sample["labels"] for sample in samples], batch_first=True, padding_value=IGNORE_INDEX
            ),
        }
        images = [sample["pixel_values"] for sample in samples if "pixel_values" in sample]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


__all__ = [
    "IGNORE_INDEX",
    "LlavaConversationDataset",
    "LlavaDataCollator",
    "to_chat_messages",
    "tokenize_conversation",
]
