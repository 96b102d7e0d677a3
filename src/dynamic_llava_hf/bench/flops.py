"""Analytic FLOPs of Dynamic-LLaVA and of its LLaVA-1.5 baseline, in two conventions.

**The paper's convention** (what its "10.1 -> 2.5 TFLOPs" prefill figure for LLaVA-1.5-7B uses). Per decoder layer that
processes N tokens of width C:

    32·N·C² + 4·N²·C

Derivation, at 2 FLOPs per multiply-add: the four attention projections cost 4·C² multiply-adds per token and the
gated MLP 3·C·(4C) (its width taken as 4C, not LLaMA's 11008 = 2.6875C), together 16·C² per token, i.e. 32·N·C²
FLOPs; QKᵀ and AV cost N²·C multiply-adds each, i.e. 4·N²·C FLOPs. **N counts the image tokens only** and C is
the hidden size; prompt text, LM head, vision tower, projector and predictors are left out. That is the reading
that reproduces the paper: with C=4096 and 32 layers, 576 image tokens give 32 × (32·576·C² + 4·576²·C) = 10.07 T,
and 576 tokens in layers 0-1 then 115 in layers 2-31 give 2.49 T (counting the ~40 prompt tokens as well would
give 10.8 T). For decoding without a KV cache we apply the same per-layer formula to every forward of the generation
(image tokens plus the generated tokens present in that forward, prompt text again left out); the paper's decoding
figures themselves were not available to check this extension against.

**Exact matmul counts** of this package's implementation (`ModelShape`, `prefill_flops`, `cached_decode_flops`,
`no_cache_decode_flops`): 2·M·N·K for every matrix product the forward runs, as `torch.utils.flop_counter` counts
them: q/k/v/o projections (grouped-query attention included), the gated MLP at its real intermediate size, QKᵀ and
AV over the full query × key rectangle of each layer (what the kernels compute; causal masking does not halve it),
the LM head on the positions whose logits are computed, the predictors, the vision tower (all of its layers run) and
the projector. Norms, activations, softmax and RoPE are not counted. The instruct predictor (off in the released
models) is not modelled.
"""

from collections.abc import Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------------------------
# The paper's convention


def paper_layer_flops(num_tokens: float, hidden_size: int) -> float:
    """FLOPs of one decoder layer over `num_tokens` tokens in the paper's convention: 32·N·C² + 4·N²·C."""
    return 32 * num_tokens * hidden_size**2 + 4 * num_tokens**2 * hidden_size


def paper_prefill_flops(
    hidden_size: int,
    num_layers: int,
    num_image_tokens: int,
    kept_image_tokens: int | None = None,
    sparse_layer: int = 2,
) -> float:
    """Prefill FLOPs of one sample in the paper's convention (image tokens only).

    `kept_image_tokens=None` is the dense baseline; otherwise layers `>= sparse_layer` see only the kept tokens.
    """
    _check_sparse_layer(sparse_layer, num_layers)
    kept = num_image_tokens if kept_image_tokens is None else kept_image_tokens
    dense_layers = num_layers if kept_image_tokens is None else sparse_layer
    return dense_layers * paper_layer_flops(num_image_tokens, hidden_size) + (
        num_layers - dense_layers
    ) * paper_layer_flops(kept, hidden_size)


def paper_no_cache_decode_flops(
    hidden_size: int,
    num_layers: int,
    num_image_tokens: int,
    num_new_tokens: int,
    kept_image_tokens: int | None = None,
    output_keep_rate: float | None = None,
    sparse_layer: int = 2,
) -> float:
    """FLOPs of generating `num_new_tokens` tokens without a KV cache, in the paper's convention (one sample).

    Forward `s` (s = 0 … num_new_tokens-1) re-reads the image and the `s` tokens generated so far. Dense layers see
    all of them; with sparsification (`kept_image_tokens` / `output_keep_rate` given) layers `>= sparse_layer` see the
    kept image tokens, the kept share of the `s-1` earlier outputs and the newest output.
    """
    _check_sparse_layer(sparse_layer, num_layers)
    total = 0.0
    for step in range(num_new_tokens):
        dense_tokens = num_image_tokens + step
        sparse_tokens = _sparse_tokens(
            num_image_tokens if kept_image_tokens is None else kept_image_tokens, step, output_keep_rate
        )
        total += sparse_layer * paper_layer_flops(dense_tokens, hidden_size)
        total += (num_layers - sparse_layer) * paper_layer_flops(sparse_tokens, hidden_size)
    return total


def _sparse_tokens(base_tokens: float, step: int, output_keep_rate: float | None) -> float:
    """Tokens a layer `>= sparse_layer` processes in no-cache forward `step`: `base_tokens` plus the outputs."""
    if step == 0:
        return base_tokens
    rate = 1.0 if output_keep_rate is None else output_keep_rate
    return base_tokens + rate * (step - 1) + 1  # the newest output is always computed


def _check_sparse_layer(sparse_layer: int, num_layers: int) -> None:
    if not 0 < sparse_layer < num_layers:
        raise ValueError(f"sparse_layer must be in [1, {num_layers}), got {sparse_layer}")


# ---------------------------------------------------------------------------------------------------------------------
# Exact matmul counts


@dataclass(frozen=True)
class ModelShape:
    """The sizes that determine the matmul FLOPs of a (Dynamic-)LLaVA model; build it with `from_config`."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_layers: int
    vision_num_tokens: int  # tokens inside the vision tower per image (patches, plus the class token)
    patch_flops_per_token: int  # multiply-adds of the patch embedding per patch (channels · patch²)
    num_patches: int
    image_tokens: int  # image features per image fed to the language model
    projector_in_features: int
    sparse_layer: int = 2
    image_predictor_d_model: int | None = None  # None: no image predictor
    image_predictor_ffn_dim: int = 0
    image_predictor_num_layers: int = 0
    text_predictor_d_model: int | None = None  # None: no output-text predictor

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Shape of a `DynamicLlavaConfig`, or of a plain `LlavaConfig` (no predictors) for the baseline.

        The vision tower is read as CLIP-like (patch embedding, class token if it is a CLIP tower, pre-norm encoder
        layers with a two-matrix MLP).
        """
        text = config.get_text_config(decoder=True)
        vision = config.vision_config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        num_patches = (vision.image_size // vision.patch_size) ** 2
        class_token = 1 if "clip" in vision.model_type else 0
        feature_layers = config.vision_feature_layer
        num_feature_layers = 1 if isinstance(feature_layers, int) else len(feature_layers)
        image_tokens = num_patches + (class_token if config.vision_feature_select_strategy == "full" else 0)
        has_image_predictor = getattr(config, "use_vision_predictor", False)
        has_text_predictor = getattr(config, "use_output_text_predictor", False)
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_num_layers=vision.num_hidden_layers,
            vision_num_tokens=num_patches + class_token,
            patch_flops_per_token=getattr(vision, "num_channels", 3) * vision.patch_size**2,
            num_patches=num_patches,
            image_tokens=image_tokens,
            projector_in_features=vision.hidden_size * num_feature_layers,
            sparse_layer=getattr(config, "sparse_layer", 2),
            image_predictor_d_model=config.predictor_d_model if has_image_predictor else None,
            image_predictor_ffn_dim=config.predictor_ffn_dim if has_image_predictor else 0,
            image_predictor_num_layers=config.predictor_num_layers if has_image_predictor else 0,
            text_predictor_d_model=config.predictor_d_model if has_text_predictor else None,
        )

    def kept_image_tokens(self, vision_keep_rate: float) -> int:
        """Image tokens kept per image at `vision_keep_rate`: floor(tokens · rate), as the model computes it."""
        return int(self.image_tokens * vision_keep_rate)


def decoder_flops(shape: ModelShape, queries: Sequence[float], keys: Sequence[float]) -> dict[str, float]:
    """One row through the decoder stack; `queries[l]` / `keys[l]` are the query / key counts of layer `l`."""
    if len(queries) != shape.num_layers or len(keys) != shape.num_layers:
        raise ValueError(f"need one query and one key count per decoder layer ({shape.num_layers})")
    hidden, heads, head_dim = shape.hidden_size, shape.num_heads, shape.head_dim
    # q and o use all heads, k and v the key/value heads (grouped-query attention).
    projection = 2 * hidden * head_dim * (2 * heads + 2 * shape.num_kv_heads)
    mlp = 3 * 2 * hidden * shape.intermediate_size
    return {
        "decoder_projections": projection * sum(queries),
        "decoder_mlp": mlp * sum(queries),
        "decoder_attention": 2 * 2 * heads * head_dim * sum(q * k for q, k in zip(queries, keys)),
    }


def vision_flops(shape: ModelShape, num_images: int) -> dict[str, float]:
    """Vision tower (every layer runs) and projector for `num_images` images."""
    tokens, width = shape.vision_num_tokens, shape.vision_hidden_size
    per_layer = 2 * tokens * (4 * width**2 + 2 * width * shape.vision_intermediate_size) + 4 * tokens**2 * width
    tower = 2 * shape.num_patches * shape.patch_flops_per_token * width + shape.vision_num_layers * per_layer
    projector = 2 * shape.image_tokens * (shape.projector_in_features + shape.hidden_size) * shape.hidden_size
    return {"vision_tower": num_images * tower, "projector": num_images * projector}


def image_predictor_flops(shape: ModelShape, num_images: int) -> dict[str, float]:
    """Image predictor over `num_images` images; its attention core (sdpa) is reported apart."""
    if shape.image_predictor_d_model is None:
        return {}
    tokens, d_model, ffn = shape.image_tokens, shape.image_predictor_d_model, shape.image_predictor_ffn_dim
    per_block = 2 * tokens * (3 * d_model**2 + d_model**2 + 2 * d_model * ffn)
    linear = (
        2 * tokens * shape.hidden_size * d_model
        + shape.image_predictor_num_layers * per_block
        + 2 * tokens * _output_mlp_macs(d_model)
    )
    attention = shape.image_predictor_num_layers * 4 * tokens**2 * d_model
    return {"image_predictor": num_images * linear, "image_predictor_attention": num_images * attention}


def text_predictor_flops(shape: ModelShape, num_tokens: float) -> dict[str, float]:
    """Output-text predictor (a per-token MLP) over `num_tokens` tokens."""
    if shape.text_predictor_d_model is None:
        return {}
    d_model = shape.text_predictor_d_model
    return {"output_text_predictor": num_tokens * 2 * (shape.hidden_size * d_model + _output_mlp_macs(d_model))}


def _output_mlp_macs(d_model: int) -> int:
    # The predictors' output MLP: d -> d/2 -> d/4 -> 2.
    return d_model * (d_model // 2) + (d_model // 2) * (d_model // 4) + (d_model // 4) * 2


def lm_head_flops(shape: ModelShape, num_positions: float) -> dict[str, float]:
    return {"lm_head": num_positions * 2 * shape.hidden_size * shape.vocab_size}


def merge_flops(*parts: dict[str, float], scale: float = 1.0) -> dict[str, float]:
    """Adds breakdowns component by component (times `scale`)."""
    total: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0.0) + value * scale
    return total


def total_flops(breakdown: dict[str, float]) -> float:
    return float(sum(breakdown.values()))


def _layer_counts(shape: ModelShape, dense: float, sparse: float) -> list[float]:
    return [dense] * shape.sparse_layer + [sparse] * (shape.num_layers - shape.sparse_layer)


def prefill_flops(
    shape: ModelShape,
    num_text_tokens: int,
    num_images: int = 1,
    vision_keep_rate: float | None = None,
    batch_size: int = 1,
    logits_positions: int = 1,
) -> dict[str, float]:
    """Matmul FLOPs of a prefill forward (vision included) of `batch_size` identical-length rows.

    `vision_keep_rate=None` is the dense baseline (also Dynamic-LLaVA with sparsification off); otherwise the image
    predictor runs and layers `>= sparse_layer` see the text and the kept image tokens. `logits_positions` is 1 in
    `generate()` (`logits_to_keep=1`).
    """
    image_tokens = num_images * shape.image_tokens
    dense = num_text_tokens + image_tokens
    parts = [vision_flops(shape, num_images)]
    if vision_keep_rate is None:
        sparse = dense
    else:
        _require_image_predictor(shape)
        sparse = num_text_tokens + num_images * shape.kept_image_tokens(vision_keep_rate)
        parts.append(image_predictor_flops(shape, num_images))
    queries = _layer_counts(shape, dense, sparse)
    parts += [decoder_flops(shape, queries, queries), lm_head_flops(shape, logits_positions)]
    return merge_flops(*parts, scale=batch_size)


def cached_decode_flops(
    shape: ModelShape,
    prompt_tokens: int,
    num_new_tokens: int,
    kept_prompt_tokens: float | None = None,
    output_keep_rate: float | None = None,
    batch_size: int = 1,
) -> dict[str, float]:
    """Matmul FLOPs of the `num_new_tokens - 1` decoding forwards with a KV cache (the first token comes from the
    prefill). `prompt_tokens` / `kept_prompt_tokens` are the cache entries the prefill left in layers below / from
    `sparse_layer` on. With `output_keep_rate` the output-text predictor runs on each new token and that share of
    the generated tokens enters the cache of the later layers (None: the dense baseline keeps every token).
    """
    if output_keep_rate is not None:
        _require_text_predictor(shape)
    kept_prompt = prompt_tokens if kept_prompt_tokens is None else kept_prompt_tokens
    rate = 1.0 if output_keep_rate is None else output_keep_rate
    parts = []
    for step in range(1, num_new_tokens):
        # Forward `step` feeds generated token `step`; tokens 1 … step-1 are already in the cache.
        keys = _layer_counts(shape, prompt_tokens + step, kept_prompt + rate * (step - 1) + 1)
        parts.append(decoder_flops(shape, [1] * shape.num_layers, keys))
        parts.append(lm_head_flops(shape, 1))
        if output_keep_rate is not None:
            parts.append(text_predictor_flops(shape, 1))
    return merge_flops(*parts, scale=batch_size)


def no_cache_decode_flops(
    shape: ModelShape,
    num_text_tokens: int,
    num_new_tokens: int,
    num_images: int = 1,
    vision_keep_rate: float | None = None,
    output_keep_rate: float | None = None,
    batch_size: int = 1,
) -> dict[str, float]:
    """Matmul FLOPs of `generate(use_cache=False)` producing `num_new_tokens` tokens: `num_new_tokens` full forwards.

    As `generate()` runs it: the images are encoded once (the features are re-sent to every forward), each forward
    re-runs the image predictor and, from the third forward on, the output-text predictor over the whole sequence;
    layers `>= sparse_layer` then see the text, the kept image tokens, the kept share of the earlier outputs and the
    newest output. `vision_keep_rate=None` and `output_keep_rate=None` give the dense baseline.
    """
    if output_keep_rate is not None:
        _require_text_predictor(shape)
    image_tokens = num_images * shape.image_tokens
    parts = [vision_flops(shape, num_images)]
    kept_image = image_tokens
    if vision_keep_rate is not None:
        _require_image_predictor(shape)
        kept_image = num_images * shape.kept_image_tokens(vision_keep_rate)
    for step in range(num_new_tokens):
        dense = num_text_tokens + image_tokens + step
        sparse = _sparse_tokens(num_text_tokens + kept_image, step, output_keep_rate)
        queries = _layer_counts(shape, dense, sparse)
        parts += [decoder_flops(shape, queries, queries), lm_head_flops(shape, 1)]
        if vision_keep_rate is not None:
            parts.append(image_predictor_flops(shape, num_images))
        if output_keep_rate is not None and step >= 2:
            parts.append(text_predictor_flops(shape, dense))
    return merge_flops(*parts, scale=batch_size)


def cached_decode_kv_read_bytes(
    shape: ModelShape,
    prompt_tokens: int,
    num_new_tokens: int,
    bytes_per_value: int,
    kept_prompt_tokens: float | None = None,
    output_keep_rate: float | None = None,
    batch_size: int = 1,
) -> float:
    """K/V bytes the decoding forwards of `cached_decode_flops` read (each reads every stored entry of each layer)."""
    kept_prompt = prompt_tokens if kept_prompt_tokens is None else kept_prompt_tokens
    rate = 1.0 if output_keep_rate is None else output_keep_rate
    bytes_per_entry = 2 * shape.num_kv_heads * shape.head_dim * bytes_per_value
    entries = sum(
        sum(_layer_counts(shape, prompt_tokens + step, kept_prompt + rate * (step - 1) + 1))
        for step in range(1, num_new_tokens)
    )
    return float(batch_size * entries * bytes_per_entry)


def _require_image_predictor(shape: ModelShape) -> None:
    if shape.image_predictor_d_model is None:
        raise ValueError("vision_keep_rate was given but this model has no image predictor (use_vision_predictor)")


def _require_text_predictor(shape: ModelShape) -> None:
    if shape.text_predictor_d_model is None:
        raise ValueError(
            "output_keep_rate was given but this model has no output-text predictor (use_output_text_predictor)"
        )


__all__ = [
    "ModelShape",
    "cached_decode_flops",
    "cached_decode_kv_read_bytes",
    "decoder_flops",
    "image_predictor_flops",
    "lm_head_flops",
    "merge_flops",
    "no_cache_decode_flops",
    "paper_layer_flops",
    "paper_no_cache_decode_flops",
    "paper_prefill_flops",
    "prefill_flops",
    "text_predictor_flops",
    "total_flops",
    "vision_flops",
]
