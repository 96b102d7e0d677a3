"""The analytic side of `dynamic-llava bench`: FLOP counts of the prefill and of decoding without a cache for our model
and the baseline (`flops.py`), as they are reported beside the measured times and on their own (`--analytic-only`)."""

from ..configuration_dynamic_llava import DynamicLlavaConfig
from .flops import (
    ModelShape,
    no_cache_decode_flops,
    paper_no_cache_decode_flops,
    paper_prefill_flops,
    prefill_flops,
    total_flops,
)
from .presets import PRESETS, BenchPreset, BenchSettings


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None where either is unknown (e.g. no peak memory measured) or the divisor is 0."""
    return numerator / denominator if numerator is not None and denominator else None


def analytic_prefill(shape: ModelShape, base_shape: ModelShape, preset: BenchPreset, keep_rate: float, batch: int):
    kept = shape.kept_image_tokens(keep_rate)
    exact_ours = total_flops(
        prefill_flops(shape, preset.num_text_tokens, vision_keep_rate=keep_rate, batch_size=batch)
    )
    exact_base = total_flops(prefill_flops(base_shape, preset.num_text_tokens, batch_size=batch))
    paper = [
        paper_prefill_flops(shape.hidden_size, shape.num_layers, shape.image_tokens, k, shape.sparse_layer) * batch
        for k in (kept, None)
    ]
    return {
        "kept_image_tokens": kept,
        "image_tokens": shape.image_tokens,
        "exact": {"ours": exact_ours, "baseline": exact_base, "ratio": ratio(exact_ours, exact_base)},
        "paper": {"ours": paper[0], "baseline": paper[1], "ratio": ratio(paper[0], paper[1])},
    }


def analytic_no_cache_decode(
    shape: ModelShape, base_shape: ModelShape, preset: BenchPreset, keep_rate: float, output_keep_rate: float, tokens
):
    kept = shape.kept_image_tokens(keep_rate)
    exact_ours = total_flops(
        no_cache_decode_flops(
            shape, preset.num_text_tokens, tokens, vision_keep_rate=keep_rate, output_keep_rate=output_keep_rate
        )
    )
    exact_base = total_flops(no_cache_decode_flops(base_shape, preset.num_text_tokens, tokens))
    args = (shape.hidden_size, shape.num_layers, shape.image_tokens, tokens)
    paper_ours = paper_no_cache_decode_flops(*args, kept, output_keep_rate, shape.sparse_layer)
    paper_base = paper_no_cache_decode_flops(*args, sparse_layer=shape.sparse_layer)
    return {
        "new_tokens": tokens,
        "output_keep_rate": output_keep_rate,
        "exact": {"ours": exact_ours, "baseline": exact_base, "ratio": ratio(exact_ours, exact_base)},
        "paper": {"ours": paper_ours, "baseline": paper_base, "ratio": ratio(paper_ours, paper_base)},
    }


def analytic_results(settings: BenchSettings) -> dict:
    """The FLOPs part alone, from the preset's shapes (no weights are built): works for every preset anywhere."""
    settings.validate()
    preset = PRESETS[settings.preset]
    config = preset.config(settings.vision_keep_rate)
    shape = ModelShape.from_config(config)
    base_shape = ModelShape.from_config(baseline_config(config))
    keep_rate = config.vision_keep_rate
    new_tokens = settings.new_tokens or preset.cuda_new_tokens
    return {
        "preset": preset.name,
        "description": preset.description,
        "vision_keep_rate": keep_rate,
        "analytic_only": True,
        "prefill_flops": analytic_prefill(shape, base_shape, preset, keep_rate, 1),
        "no_cache_decode_flops": [
            analytic_no_cache_decode(shape, base_shape, preset, keep_rate, settings.output_keep_rate, tokens)
            for tokens in new_tokens
        ],
    }


def baseline_config(config: DynamicLlavaConfig) -> DynamicLlavaConfig:
    """The same shapes without predictors, for the baseline's FLOPs."""
    return DynamicLlavaConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        sparse_layer=config.sparse_layer,
        use_vision_predictor=False,
        use_output_text_predictor=False,
    )
