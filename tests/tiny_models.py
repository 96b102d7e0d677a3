"""Tiny random Dynamic-LLaVA models and batched inputs shared by the tests."""

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dynamic_llava_hf import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration


VOCAB_SIZE = 100
IMAGE_TOKEN_ID = 99
PAD_TOKEN_ID = 0
IMAGE_SIZE = 42  # 3x3 patches of 14 px -> 9 image tokens per image


def tiny_text_config(**overrides) -> dict:
    config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.update(overrides)
    return config


def tiny_vision_config() -> dict:
    return dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=14,
        projection_dim=24,
    )


def tiny_config(attn_implementation: str = "sdpa", text_overrides: dict | None = None, **overrides):
    kwargs = dict(
        text_config=LlamaConfig(**tiny_text_config(**(text_overrides or {}))),
        vision_config=CLIPVisionConfig(**tiny_vision_config()),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=9,
        vision_keep_rate=0.5,
        predictor_d_model=16,
        predictor_num_heads=2,
        predictor_ffn_dim=32,
        sparse_layer=2,
    )
    kwargs.update(overrides)
    config = DynamicLlavaConfig(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> DynamicLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = DynamicLlavaForConditionalGeneration(tiny_config(attn_implementation, **overrides)).eval()
    spread_output_text_decisions(model)
    return model


def spread_output_text_decisions(model) -> None:
    """Random predictors keep or drop nearly everything; scale the last layer so decisions vary per token."""
    with torch.no_grad():
        for predictor in (model.model.output_text_score_predictor, model.model.instruct_score_predictor):
            if predictor is not None:
                predictor.output_mlp[-1].weight.mul_(50.0)


def llava_twin(model: DynamicLlavaForConditionalGeneration, attn_implementation: str) -> LlavaForConditionalGeneration:
    """transformers' Llava with the same weights (predictors aside)."""
    llava_config = LlavaConfig(
        text_config=model.config.text_config.to_dict(),
        vision_config=model.config.vision_config.to_dict(),
        image_token_index=model.config.image_token_id,
        image_seq_length=model.config.image_seq_length,
    )
    llava_config._attn_implementation = attn_implementation
    twin = LlavaForConditionalGeneration(llava_config).eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    assert all("predictor" in key for key in unexpected), unexpected
    return twin


def build_prompts(rows: list[tuple[int, int, int]], pad_to: int | None = None, seed: int = 0):
    """Left-padded batch. Each row is (text before the image(s), number of images, text after).

    Returns input_ids, attention_mask and pixel_values (one image per image slot, in row order).
    """
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    num_images = 0
    for before, images, after in rows:
        ids = [1] + torch.randint(3, IMAGE_TOKEN_ID - 1, (before,), generator=generator).tolist()
        for _ in range(images):
            ids += [IMAGE_TOKEN_ID] * 9 + torch.randint(3, IMAGE_TOKEN_ID - 1, (1,), generator=generator).tolist()
        ids += torch.randint(3, IMAGE_TOKEN_ID - 1, (after,), generator=generator).tolist()
        sequences.append(torch.tensor(ids))
        num_images += images
    input_ids = pad_sequence(sequences, batch_first=True, padding_value=PAD_TOKEN_ID, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(ids) for ids in sequences], batch_first=True, padding_side="left")
    extra = max(0, (pad_to or 0) - input_ids.shape[1])  # more padding columns, up to `pad_to`
    input_ids = F.pad(input_ids, (extra, 0), value=PAD_TOKEN_ID)
    attention_mask = F.pad(attention_mask, (extra, 0))
    pixel_values = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return input_ids, attention_mask, pixel_values


def images_per_row(rows):
    return [images for _, images, _ in rows]
