"""LLaVA-1.5 processor pieces for Dynamic-LLaVA checkpoints: vicuna_v1 chat template, image preprocessing, tokens.

Dynamic-LLaVA was trained on LLaVA-1.5's data pipeline, so a converted checkpoint should see exactly that:
- the `vicuna_v1` conversation format (LLaVA's `conv_vicuna_v1`, separators " " and "</s>", image placeholder at the
  start of the user text followed by a newline);
- `image_aspect_ratio="pad"`: pad to a square with the CLIP mean colour (`expand2square`), then CLIP's
  resize-shortest-edge / center-crop / normalise;
- `<image>` and `<pad>` appended to the tokenizer the way llava-hf's conversion does, with the vocabulary of the
  embeddings and `lm_head` padded to a multiple of 64.

Everything here uses transformers' own classes (`LlavaProcessor`, `LlavaImageProcessorPil`), so a folder saved with
these loads with `AutoProcessor` and works with `pipeline("image-text-to-text")`.
"""

from dataclasses import dataclass

import torch
from tokenizers import AddedToken
from transformers import LlavaImageProcessorPil, LlavaProcessor
from transformers.image_utils import PILImageResampling
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VICUNA_V1_SYSTEM_MESSAGE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# LLaVA's conv_vicuna_v1 rendered as "{system} USER: {user} ASSISTANT: {answer}</s>USER: ...". Images become
# "<image>\n" placeholders in front of the user's text (the processor expands each into one token per image feature).
# Several text parts of one message are joined with a space. The tokenizer adds BOS itself (the template has none), as
# in LLaVA's `tokenizer_image_token`. `{% generation %}` marks the answers for `return_assistant_tokens_mask`.
VICUNA_V1_CHAT_TEMPLATE = (
    r"""{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set conversation = messages[1:] -%}
{%- else -%}
    {%- set system_message = '"""
    + VICUNA_V1_SYSTEM_MESSAGE.replace("'", "\\'")
    + r"""' -%}
    {%- set conversation = messages -%}
{%- endif -%}
{%- if system_message is not string -%}
    {%- set system_message = system_message | selectattr('type', 'equalto', 'text')
        | map(attribute='text') | join(' ') -%}
{%- endif -%}
{{- system_message + ' ' -}}
{%- for message in conversation -%}
    {%- if message['content'] is string -%}
        {%- set parts = [{'type': 'text', 'text': message['content']}] -%}
    {%- else -%}
        {%- set parts = message['content'] -%}
    {%- endif -%}
    {%- for part in parts if part['type'] not in ('image', 'text') -%}
        {{- raise_exception("The vicuna_v1 template only supports 'image' and 'text' content, got " + part['type']) -}}
    {%- endfor -%}
    {%- set text = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' -}}
        {%- for part in parts if part['type'] == 'image' -%}
            {{- '<image>\n' -}}
        {%- endfor -%}
        {{- text + ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT: ' -}}
        {%- generation -%}
            {{- text + '</s>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('The vicuna_v1 template only supports the roles system (first message), user and '
            + 'assistant, got ' + message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""
)

# llava-hf pads the vocabulary (embedding and lm_head rows) to a multiple of 64 for tensor-core friendly shapes.
VOCAB_PAD_MULTIPLE = 64


@dataclass(frozen=True)
class LlavaSpecialTokens:
    """What `add_llava_special_tokens` did: the two ids and the tokens that were new to the tokenizer."""

    image_token_id: int
    pad_token_id: int
    added_tokens: tuple[str, ...]


def build_image_processor(
    image_size: int = 336, image_mean: list[float] | None = None, image_std: list[float] | None = None
) -> LlavaImageProcessorPil:
    """LLaVA-1.5's preprocessing: pad to a square with the mean colour, bicubic resize of the shortest edge to
    `image_size`, center crop, rescale to [0, 1] and normalise with the CLIP mean/std.

    The PIL backend is used on purpose: LLaVA-1.5 was trained with PIL resizing, and the image-text-to-text pipeline
    requires it.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return LlavaImageProcessorPil(
        do_pad=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(image_mean or OPENAI_CLIP_MEAN),
        image_std=list(image_std or OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def build_processor(tokenizer, image_processor=None, image_size: int = 336, patch_size: int = 14) -> LlavaProcessor:
    """A `LlavaProcessor` for a LLaVA-1.5 / Dynamic-LLaVA checkpoint.

    The tokenizer must already contain `<image>` (see `add_llava_special_tokens`). It is switched to left padding,
    which batched generation needs. Each image becomes `(image_size // patch_size) ** 2` image tokens (CLIP's CLS
    token is counted by `num_additional_image_tokens=1` and removed again by the "default" feature strategy).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"The tokenizer has no {IMAGE_TOKEN} token; call add_llava_special_tokens(tokenizer) first")
    if tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False) != [image_token_id]:
        raise ValueError(f"The tokenizer splits {IMAGE_TOKEN}; it must be an added special token")
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
    return LlavaProcessor(
        image_processor=image_processor if image_processor is not None else build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=VICUNA_V1_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def add_llava_special_tokens(tokenizer) -> LlavaSpecialTokens:
    """Adds `<image>` and then `<pad>` (as the pad token), like llava-hf's conversion of LLaVA-1.5.

    On a fresh Vicuna tokenizer this gives `<image>` = old vocabulary size (32000) and `<pad>` = old size + 1. Tokens
    the tokenizer already has are reused, so calling it twice changes nothing.
    """
    added = []
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        added.append(IMAGE_TOKEN)
    if PAD_TOKEN not in vocab:
        added.append(PAD_TOKEN)
    if PAD_TOKEN not in vocab or tokenizer.pad_token != PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    return LlavaSpecialTokens(
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        added_tokens=tuple(added),
    )


def padded_vocab_size(num_tokens: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that holds `num_tokens` rows (llava-hf: 32002 -> 32064)."""
    return -(-num_tokens // multiple) * multiple


def extend_vocab_rows(weight: torch.Tensor, num_rows: int, seed: int = 0) -> torch.Tensor:
    """`weight` (embedding or lm_head, `[vocab, hidden]`) with rows appended up to `num_rows`.

    New rows are drawn around the mean of the existing rows, as llava-hf's converter draws them from
    N(mean, 1e-5 * covariance); here from the covariance's diagonal and a fixed `seed`, so conversion stays
    deterministic. They differ from each other, which matters: with `inputs_embeds` the model finds the image
    placeholders by comparing each embedding with the `<image>` row, so a `<pad>` or padding row equal to it would
    count as an image token. The spread is far below that of the existing rows: the image token's embedding is never
    read (image features replace it), `<pad>` only sits under masked positions, and the lm_head rows give every new
    token about the average logit, far below the top ones; the converters also list the new ids in
    `generation_config.suppress_tokens`.
    """
    if num_rows < weight.shape[0]:
        raise ValueError(f"Cannot shrink a vocabulary of {weight.shape[0]} rows to {num_rows}")
    if num_rows == weight.shape[0]:
        return weight
    rows = weight.float()
    noise = torch.randn(num_rows - weight.shape[0], weight.shape[1], generator=torch.Generator().manual_seed(seed))
    new_rows = rows.mean(0) + noise.to(rows.device) * (1e-5 * rows.var(0, correction=0)).sqrt()
    return torch.cat([weight, new_rows.to(weight.dtype)], dim=0)


__all__ = [
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "VICUNA_V1_CHAT_TEMPLATE",
    "VICUNA_V1_SYSTEM_MESSAGE",
    "LlavaSpecialTokens",
    "add_llava_special_tokens",
    "build_image_processor",
    "build_processor",
    "extend_vocab_rows",
    "padded_vocab_size",
]
