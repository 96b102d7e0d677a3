"""Dynamic-LLaVA: LLaVA-1.5 with learned vision/text context sparsification (Huang et al., ICLR 2025).

The model runs the text backbone's decoder layers in its own loop so that, at the input of `sparse_layer`, it can
physically remove image tokens (top-k per image by the image predictor) and gate which generated tokens enter the KV
cache of the later layers (output-text predictor). Everything else is transformers' Llava.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMode
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from .cache_dynamic_llava import FULL_GROUP, SPARSE_GROUP, DynamicLlavaCache
from .configuration_dynamic_llava import DynamicLlavaConfig, check_keep_rate


# ---------------------------------------------------------------------------------------------------------------------
# Predictors (architecture and sub-module names of the official implementation; output index 0 = keep, 1 = drop)


class PredictorAttention(nn.Module):
    """Bidirectional multi-head self-attention over one image's tokens (fused qkv without bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class PredictorMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PredictorBlock(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PredictorAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = PredictorMlp(dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DynamicLlavaImagePredictor(nn.Module):
    """Scores the tokens of one image: `[images, tokens, hidden] -> [images, tokens, 2]` keep/drop logits.

    Half of each token's features stay local; the other half is averaged over the image (weighted by `policy`, the
    training-time keep mask) and broadcast, so every score sees the whole image.
    """

    def __init__(self, hidden_size: int, d_model: int, num_heads: int, ffn_dim: int, num_layers: int):
        super().__init__()
        self.down_mlp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model), nn.GELU())
        self.transformer = nn.ModuleList([PredictorBlock(d_model, num_heads, ffn_dim) for _ in range(num_layers)])
        self.output_mlp = nn.Sequential(
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, image_hidden_states: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        x = self.down_mlp(image_hidden_states)
        if policy is not None:
            x = x * policy
        for block in self.transformer:
            x = block(x)
        local_features, global_features = x.chunk(2, dim=-1)
        if policy is None:
            global_features = global_features.mean(dim=1, keepdim=True)
        else:
            global_features = (global_features * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        x = torch.cat([local_features, global_features.expand_as(local_features)], dim=-1)
        return self.output_mlp(x)


class DynamicLlavaTextPredictor(nn.Module):
    """Per-token keep/drop logits of text tokens (output-text and instruct predictors): `[..., H] -> [..., 2]`."""

    def __init__(self, hidden_size: int, d_model: int):
        super().__init__()
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output_mlp(hidden_states)


# ---------------------------------------------------------------------------------------------------------------------
# Per-call sparsification settings


@dataclass(frozen=True)
class SparsitySettings:
    """What a forward/generate call sparsifies. Pass `sparsity=` to `forward` or `generate` to override the config:
    `False` switches everything off, a dict overrides single fields (e.g. `{"vision_keep_rate": 0.5}`)."""

    use_vision_predictor: bool
    vision_keep_rate: float
    use_output_text_predictor: bool
    use_instruct_predictor: bool

    @classmethod
    def from_config(cls, config) -> "SparsitySettings":
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})

    @classmethod
    def off(cls) -> "SparsitySettings":
        return cls(False, 1.0, False, False)

    @property
    def enabled(self) -> bool:
        return self.use_vision_predictor or self.use_output_text_predictor or self.use_instruct_predictor


def resolve_sparsity(model: "DynamicLlavaModel", sparsity) -> SparsitySettings:
    """Turns the `sparsity` argument into settings, checking that the predictors it needs exist."""
    if sparsity is None or sparsity is True:
        settings = SparsitySettings.from_config(model.config)
    elif sparsity is False:
        return SparsitySettings.off()
    elif isinstance(sparsity, SparsitySettings):
        settings = sparsity
    elif isinstance(sparsity, dict):
        known = {field.name for field in dataclasses.fields(SparsitySettings)}
        unknown = set(sparsity) - known
        if unknown:
            raise ValueError(f"Unknown sparsity setting(s) {sorted(unknown)}; valid ones are {sorted(known)}")
        settings = dataclasses.replace(SparsitySettings.from_config(model.config), **sparsity)
    else:
        raise TypeError(
            f"sparsity must be None, True, False, a dict or a SparsitySettings, got {type(sparsity).__name__}"
        )
    check_keep_rate("vision_keep_rate", settings.vision_keep_rate)
    for flag, module in (
        ("use_vision_predictor", "image_score_predictor"),
        ("use_output_text_predictor", "output_text_score_predictor"),
        ("use_instruct_predictor", "instruct_score_predictor"),
    ):
        if getattr(settings, flag) and getattr(model, module) is None:
            raise ValueError(
                f"{flag}=True needs the {module}, which this model does not have: it was built with "
                f"config.{flag}=False. Rebuild/convert the model with the predictor to use it."
            )
    return settings


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class DynamicLlavaModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.Tensor`, *optional*):
        Projected image features, `[num_images, tokens_per_image, hidden_size]`.
    kept_image_token_indices (`list[torch.LongTensor]`, *optional*):
        Per row, the indices (into that row's image tokens, ascending) of the image tokens kept at `sparse_layer`.
        `None` when no image pruning ran in this call.
    output_keep_decisions (`torch.BoolTensor`, *optional*):
        `[batch, new_tokens]`, whether each token's K/V was kept in layers `>= sparse_layer` by the output-text
        predictor. `None` when the predictor did not run in this call.
    """

    image_hidden_states: torch.Tensor | None = None
    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.BoolTensor | None = None


@dataclass
class DynamicLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    Same as [`~transformers.models.llava.modeling_llava.LlavaCausalLMOutputWithPast`]. `logits` stay aligned with the
    input positions; positions removed at `sparse_layer` get zero logits.

    kept_image_token_indices (`list[torch.LongTensor]`, *optional*):
        See [`DynamicLlavaModelOutputWithPast`].
    output_keep_decisions (`torch.BoolTensor`, *optional*):
        See [`DynamicLlavaModelOutputWithPast`].
    """

    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.BoolTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Attention masks built from the cache layout (transformers' mask helpers cannot express a ragged cache)


@dataclass
class KeyLayout:
    """Where a group of layers finds its keys in the current forward.

    `lengths[b]` entries of row `b` are stored (`past_width` = their maximum). With `in_place` the single new token
    sits at column `lengths[b]`; otherwise the new tokens follow the `past_width` stored columns.
    """

    lengths: torch.Tensor | None
    past_width: int
    in_place: bool
    uniform: bool  # every row stores `past_width` entries


def empty_layout() -> KeyLayout:
    return KeyLayout(lengths=None, past_width=0, in_place=False, uniform=True)


def cache_layout(cache: DynamicLlavaCache | None, group: int) -> KeyLayout:
    if cache is None:
        return empty_layout()
    rows = cache.groups[group]
    return KeyLayout(
        lengths=rows.lengths,
        past_width=rows.max_length,
        in_place=rows.plan.in_place,
        uniform=rows.min_length == rows.max_length,
    )


def build_attention_mask(
    attn_implementation: str, layout: KeyLayout, visible: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """Mask for one group of layers.

    A query attends to its row's stored entries, to earlier current tokens that are `visible` (not padding, not
    removed), and always to itself. Returns a bool `[B, 1, q, kv]` mask for sdpa, an additive float one for eager, a
    2D key mask for flash attention (which applies causality itself), or None where none is needed.
    """
    batch, num_new = visible.shape
    device = visible.device
    flash = attn_implementation.startswith("flash_attention")

    if layout.in_place:
        if layout.uniform:
            return None
        columns = torch.arange(layout.past_width + 1, device=device)
        key_valid = columns[None, :] <= layout.lengths.to(device)[:, None]
        if flash:
            return key_valid
        mask = key_valid[:, None, None, :]
    else:
        past_valid = torch.ones(batch, 0, dtype=torch.bool, device=device)
        if layout.past_width > 0:
            columns = torch.arange(layout.past_width, device=device)
            past_valid = columns[None, :] < layout.lengths.to(device)[:, None]
        everything_valid = (layout.past_width == 0 or layout.uniform) and bool(visible.all())
        if flash:
            return None if everything_valid else torch.cat([past_valid, visible], dim=-1)
        if everything_valid and layout.past_width == 0 and attn_implementation == "sdpa":
            return None  # sdpa then runs with is_causal=True
        causal = torch.ones(num_new, num_new, dtype=torch.bool, device=device).tril()
        current = (causal[None] & visible[:, None, :]) | torch.eye(num_new, dtype=torch.bool, device=device)[None]
        mask = torch.cat([past_valid[:, None, :].expand(batch, num_new, -1), current], dim=-1)[:, None]

    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Decisions at the sparse layer


@dataclass
class SparseLayerPlan:
    """What happens to the current tokens at `sparse_layer`.

    `keep_computing[b, i]`: token `i` continues into layers `>= sparse_layer` (None: every token does). `persist`:
    the token's K/V is stored in those layers' cache for later steps.
    """

    keep_computing: torch.Tensor | None
    persist: torch.Tensor
    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.Tensor | None = None


def keep_decision(logits: torch.Tensor) -> torch.Tensor:
    """Keep iff logit_keep > logit_drop (strict), as in the official inference code."""
    return logits[..., 0] > logits[..., 1]


# ---------------------------------------------------------------------------------------------------------------------
# Models


class DynamicLlavaPreTrainedModel(LlavaPreTrainedModel):
    config_class = DynamicLlavaConfig
    # The ragged cache and the data-dependent pruning rule out static shapes, BlockMasks and external backends.
    _can_compile_fullgraph = False
    _supports_flex_attn = False
    _supports_attention_backend = False


class DynamicLlavaModel(DynamicLlavaPreTrainedModel, LlavaModel):
    """Llava backbone whose decoder loop prunes image tokens and gates the KV cache at `sparse_layer`."""

    def __init__(self, config):
        # Same sub-modules (and so the same state-dict keys) as LlavaModel, plus the predictors.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)

        hidden_size = config.text_config.hidden_size
        self.image_score_predictor = (
            DynamicLlavaImagePredictor(
                hidden_size,
                config.predictor_d_model,
                config.predictor_num_heads,
                config.predictor_ffn_dim,
                config.predictor_num_layers,
            )
            if config.use_vision_predictor
            else None
        )
        self.output_text_score_predictor = (
            DynamicLlavaTextPredictor(hidden_size, config.predictor_d_model)
            if config.use_output_text_predictor
            else None
        )
        self.instruct_score_predictor = (
            DynamicLlavaTextPredictor(hidden_size, config.predictor_d_model) if config.use_instruct_predictor else None
        )
        self.post_init()

    # -----------------------------------------------------------------------------------------------------------------
    # Inputs

    def image_token_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`[batch, seq]` bool: where the image placeholder tokens are."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        expected = (getattr(vision, "num_channels", 3), vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [num_images, {expected[0]}, {expected[1]}, {expected[2]}] for this "
                f"vision tower, got {list(pixel_values.shape)}"
            )

    def merge_image_features(
        self, inputs_embeds: torch.Tensor, image_mask: torch.Tensor, image_features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, int]:
        """Writes the image features into the placeholder positions; returns the embeddings and tokens per image."""
        tokens_per_image = {features.shape[0] for features in image_features}
        if len(tokens_per_image) != 1:
            raise ValueError(
                "Every image must yield the same number of tokens for per-image pruning, "
                f"got {sorted(tokens_per_image)}"
            )
        tokens_per_image = tokens_per_image.pop()
        num_features = tokens_per_image * len(image_features)
        tokens_per_row = image_mask.sum(-1)
        num_tokens = int(tokens_per_row.sum())
        if num_tokens != num_features:
            raise ValueError(
                f"The input has {num_tokens} image tokens (id {self.config.image_token_id}) but the "
                f"{len(image_features)} image(s) give {num_features} features ({tokens_per_image} per image): the "
                f"prompt must contain {tokens_per_image} image tokens per image."
            )
        if bool((tokens_per_row % tokens_per_image).any()):
            raise ValueError(
                f"Image tokens per row {tokens_per_row.tolist()} are not multiples of the {tokens_per_image} tokens "
                "per image: every image must lie whole inside one row."
            )
        features = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], features)
        return inputs_embeds, tokens_per_image

    def resolve_cache(self, past_key_values, use_cache: bool) -> DynamicLlavaCache | None:
        if past_key_values is None:
            return DynamicLlavaCache(self.config) if use_cache else None
        if hasattr(past_key_values, "begin_step"):  # duck-typed: remote code loads the cache class separately
            return past_key_values
        if type(past_key_values) is DynamicCache and past_key_values.get_seq_length() == 0:
            return DynamicLlavaCache(self.config)  # an empty default cache, e.g. created by generate()
        raise TypeError(
            f"Dynamic-LLaVA needs a DynamicLlavaCache (it stores a different set of tokens per layer and row), got "
            f"{type(past_key_values).__name__}. Static, quantized and offloaded caches are not supported; pass no "
            "cache or an empty DynamicCache and one is created."
        )

    # -----------------------------------------------------------------------------------------------------------------
    # Decisions at the sparse layer

    def plan_sparse_layer(
        self,
        hidden_states: torch.Tensor,
        image_mask: torch.Tensor,
        valid: torch.Tensor,
        tokens_per_image: int | None,
        has_past: bool,
        num_generated_tokens: int,
        settings: SparsitySettings,
    ) -> SparseLayerPlan:
        """Applies the predictors to the input of `sparse_layer` and decides what the later layers see and store."""
        num_new = valid.shape[1]
        device = valid.device
        removed = torch.zeros_like(valid)  # dropped from layers >= sparse_layer now (physically)
        not_stored = torch.zeros_like(valid)  # computed now, but not stored for later tokens
        plan = SparseLayerPlan(keep_computing=None, persist=valid)
        columns = torch.arange(num_new, device=device)
        prompt_end = num_new - num_generated_tokens  # without a cache the generated tokens trail the prompt

        if settings.use_vision_predictor and tokens_per_image is not None:
            dropped_images, plan.kept_image_token_indices = self.select_image_tokens(
                hidden_states, image_mask, tokens_per_image, settings.vision_keep_rate
            )
            removed |= dropped_images

        if settings.use_instruct_predictor:
            instruct_keep = keep_decision(self.instruct_score_predictor(hidden_states))
            text = valid & ~image_mask & (columns < prompt_end - 1)  # the last prompt token is always kept
            if has_past:
                # A later turn: its tokens see each other now; only the kept ones are stored.
                not_stored |= text & ~instruct_keep
            else:
                # Prompt text after each row's last image is pruned like the image tokens.
                last_image = torch.where(image_mask, columns, -1).amax(-1, keepdim=True)
                after_image = (columns > last_image) & (last_image >= 0)
                removed |= text & after_image & ~instruct_keep

        if settings.use_output_text_predictor and (num_generated_tokens > 1 or (has_past and num_new == 1)):
            output_keep = keep_decision(self.output_text_score_predictor(hidden_states))
            if has_past:
                # Decoding with a cache: the new token sees itself now and is stored only if kept.
                not_stored |= ~output_keep
                plan.output_keep_decisions = output_keep
            else:
                # Decoding without a cache: earlier generated tokens the predictor dropped are gone; the newest one
                # is being computed and stays.
                judged = (columns >= prompt_end) & (columns < num_new - 1)
                removed |= judged & ~output_keep
                plan.output_keep_decisions = output_keep[:, prompt_end:]

        plan.persist = valid & ~removed & ~not_stored
        if (
            plan.kept_image_token_indices is not None
            or settings.use_instruct_predictor
            and not has_past
            or (num_generated_tokens > 1 and settings.use_output_text_predictor)
        ):
            keep_computing = valid & ~removed
            keep_computing[:, -1] = True  # the last token's logits are always needed
            plan.keep_computing = keep_computing
        return plan

    def select_image_tokens(
        self, hidden_states: torch.Tensor, image_mask: torch.Tensor, tokens_per_image: int, keep_rate: float
    ) -> tuple[torch.Tensor, list[torch.LongTensor]]:
        """Top-k image tokens per image by log-softmax keep score, k = floor(tokens_per_image * keep_rate).

        Returns the `[batch, seq]` mask of dropped image tokens and, per row, the kept indices into the row's image
        tokens (ascending).
        """
        # Every image's token coordinates, in row order then position order: [num_images, tokens_per_image].
        coordinates = image_mask.nonzero()
        rows = coordinates[:, 0].view(-1, tokens_per_image)
        cols = coordinates[:, 1].view(-1, tokens_per_image)
        logits = self.image_score_predictor(hidden_states[rows, cols])
        scores = torch.log_softmax(logits.float(), dim=-1)[..., 0]
        num_kept = int(tokens_per_image * keep_rate)
        kept = scores.topk(num_kept, dim=-1).indices.sort(dim=-1).values  # [num_images, num_kept]

        keep_image_token = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
        dropped = torch.zeros_like(image_mask)
        dropped[rows, cols] = ~keep_image_token

        # Indices into each row's image tokens: image j of a row starts at j * tokens_per_image.
        images_per_row = (image_mask.sum(-1) // tokens_per_image).tolist()
        first_image_of_row = torch.tensor([0] + images_per_row[:-1], device=kept.device).cumsum(0)
        image_rank_in_row = torch.arange(rows.shape[0], device=kept.device) - first_image_of_row[rows[:, 0]]
        row_indices = (kept + image_rank_in_row[:, None] * tokens_per_image).split(images_per_row)
        return dropped, [indices.reshape(-1) for indices in row_indices]

    # -----------------------------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicLlavaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        sparsity: "SparsitySettings | dict | bool | None" = None,
        num_generated_tokens: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DynamicLlavaModelOutputWithPast | tuple:
        r"""
        sparsity (`SparsitySettings`, `dict` or `bool`, *optional*):
            Overrides the config's sparsification for this call: `False` switches it off (plain LLaVA), a dict
            overrides fields of [`SparsitySettings`].
        num_generated_tokens (`int`, *optional*, defaults to 0):
            Without a cache: the last `num_generated_tokens` input tokens are model outputs. Those the output-text
            predictor drops are removed from layers `>= sparse_layer` (the newest one is always computed), which makes
            no-cache decoding equal to cached decoding. `generate(use_cache=False)` sets it.
        """
        settings = resolve_sparsity(self, sparsity)
        text_config = self.config.text_config
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if output_attentions:
            raise ValueError("output_attentions is not supported by Dynamic-LLaVA (its layers see pruned sequences)")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, num_new = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        use_cache = use_cache if use_cache is not None else (text_config.use_cache and not self.training)
        cache = self.resolve_cache(past_key_values, use_cache)
        past_seen = cache.get_seq_length() if cache is not None else 0
        decoding_step = num_new == 1 and past_seen > 0
        if num_generated_tokens and past_seen > 0:
            raise ValueError("num_generated_tokens is for decoding without a cache; with a cache pass only new tokens")

        # Images: encode, check and merge into the placeholder positions. A placeholder id the model generated itself
        # (a decoding step, or the output part of a no-cache step) is an ordinary token, as in Llava.
        if decoding_step:
            image_mask = torch.zeros(batch, num_new, dtype=torch.bool, device=device)
        else:
            image_mask = self.image_token_mask(input_ids, inputs_embeds)
        if num_generated_tokens:
            image_mask[:, num_new - num_generated_tokens :] = False
        image_features = None
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            image_features = mm_encoder_outputs["image"].pooler_output
        elif pixel_values is not None:
            self.check_pixel_values(pixel_values)
            image_features = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
            ).pooler_output
        tokens_per_image = None
        if image_features is not None:
            inputs_embeds, tokens_per_image = self.merge_image_features(inputs_embeds, image_mask, image_features)
        elif not decoding_step and bool(image_mask.any()):
            raise ValueError(
                f"The input contains {int(image_mask.sum())} image tokens (id {self.config.image_token_id}) but no "
                "pixel_values or image features were given."
            )

        # Padding and positions.
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < num_new:
                raise ValueError(
                    f"attention_mask must be a 2D padding mask [batch, past + new tokens] = [{batch}, "
                    f"{past_seen + num_new}], got {list(attention_mask.shape)}"
                )
            valid = attention_mask[:, -num_new:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, num_new, dtype=torch.bool, device=device)
        if position_ids is None:
            position_ids = torch.arange(past_seen, past_seen + num_new, device=device)[None]
        position_ids = position_ids.to(device).expand(batch, num_new)

        language_model = self.language_model
        attn_implementation = text_config._attn_implementation
        hidden_states = inputs_embeds
        cos, sin = language_model.rotary_emb(hidden_states, position_ids)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        sparse_layer = self.config.sparse_layer
        layers = language_model.layers[: text_config.num_hidden_layers]

        # Layers below sparse_layer: the whole sequence; every real (non-padding) token is stored.
        if cache is not None:
            cache.begin_step(FULL_GROUP, valid)
        layout = cache_layout(cache, FULL_GROUP)
        mask = build_attention_mask(attn_implementation, layout, valid, hidden_states.dtype)
        for layer in layers[:sparse_layer]:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=(cos, sin),
                past_key_values=cache,
                use_cache=use_cache,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states.append(hidden_states)

        # The sparse layer: decide, then physically drop what the later layers must not see.
        plan = SparseLayerPlan(keep_computing=None, persist=valid)
        if settings.enabled:
            plan = self.plan_sparse_layer(
                hidden_states,
                image_mask,
                valid,
                tokens_per_image,
                has_past=past_seen > 0,
                num_generated_tokens=num_generated_tokens,
                settings=settings,
            )
        if cache is not None and tokens_per_image is not None:
            cache.record_tokens("image", (image_mask & valid).sum(-1), (image_mask & plan.persist).sum(-1))
        if cache is not None and decoding_step:
            cache.record_tokens("generated", valid.sum(-1), plan.persist.sum(-1))
        gather_index = slot_valid = None
        visible, persist = valid, plan.persist
        if plan.keep_computing is not None:
            kept_counts = plan.keep_computing.sum(-1)
            width = int(kept_counts.max())
            # Kept tokens first, in their original order (a stable sort of "removed" flags).
            gather_index = torch.sort(~plan.keep_computing, dim=-1, stable=True).indices[:, :width]
            slot_valid = torch.arange(width, device=device)[None] < kept_counts[:, None]
            hidden_states = gather_tokens(hidden_states, gather_index)
            cos, sin = gather_tokens(cos, gather_index), gather_tokens(sin, gather_index)
            visible = slot_valid
            persist = torch.gather(persist, 1, gather_index) & slot_valid

        if cache is not None:
            cache.begin_step(SPARSE_GROUP, persist)
        layout = cache_layout(cache, SPARSE_GROUP)
        mask = build_attention_mask(attn_implementation, layout, visible, hidden_states.dtype)
        for layer in layers[sparse_layer:]:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=(cos, sin),
                past_key_values=cache,
                use_cache=use_cache,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states.append(scatter_tokens(hidden_states, gather_index, slot_valid, num_new))
        hidden_states = language_model.norm(hidden_states)
        hidden_states = scatter_tokens(hidden_states, gather_index, slot_valid, num_new)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states  # transformers' convention: the last entry is normed
        if cache is not None:
            cache.end_step(num_new)

        output = DynamicLlavaModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            image_hidden_states=torch.stack(list(image_features)) if image_features is not None else None,
            kept_image_token_indices=plan.kept_image_token_indices,
            output_keep_decisions=plan.output_keep_decisions,
        )
        return output if return_dict is not False else output.to_tuple()


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`states[b, index[b, i]]` for `[batch, seq, dim]` states."""
    return torch.gather(states, 1, index[..., None].expand(-1, -1, states.shape[-1]))


def scatter_tokens(
    states: torch.Tensor, index: torch.Tensor | None, slot_valid: torch.Tensor | None, length: int
) -> torch.Tensor:
    """Inverse of `gather_tokens` onto `length` positions; positions nothing was gathered from get zeros."""
    if index is None:
        return states
    states = states.masked_fill(~slot_valid[..., None], 0)
    out = states.new_zeros(states.shape[0], length, states.shape[-1])
    return out.scatter(1, index[..., None].expand(-1, -1, states.shape[-1]), states)


class DynamicLlavaForConditionalGeneration(DynamicLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """Dynamic-LLaVA with a language-modeling head; use it like `LlavaForConditionalGeneration`."""

    def __init__(self, config):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = DynamicLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicLlavaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        sparsity: "SparsitySettings | dict | bool | None" = None,
        num_generated_tokens: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DynamicLlavaCausalLMOutputWithPast | tuple:
        r"""
        Same as [`~transformers.LlavaForConditionalGeneration.forward`], plus `sparsity` and `num_generated_tokens`
        (see [`DynamicLlavaModel.forward`]).
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            sparsity=sparsity,
            num_generated_tokens=num_generated_tokens,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        output = DynamicLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
            kept_image_token_indices=outputs.kept_image_token_indices,
            output_keep_decisions=outputs.output_keep_decisions,
        )
        return output if return_dict is not False else output.to_tuple()

    # -----------------------------------------------------------------------------------------------------------------
    # generate() integration

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "Assisted/speculative decoding is not supported by Dynamic-LLaVA: it rolls the cache back (crop), "
                "which a cache that drops tokens cannot do."
            )
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by Dynamic-LLaVA, "
                "which needs its own DynamicLlavaCache (a different set of tokens per layer and row); leave "
                "cache_implementation unset."
            )
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["past_key_values"] = DynamicLlavaCache(self.config)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get("past_key_values") is None:
            # Without a cache every step re-reads prompt + outputs; the model needs to know which tokens are outputs.
            num_new_tokens = kwargs.get("num_new_tokens", args[1] if len(args) > 1 else 1)
            model_kwargs["num_generated_tokens"] = model_kwargs.get("num_generated_tokens", 0) + num_new_tokens
        return model_kwargs


__all__ = [
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlavaPreTrainedModel",
    "DynamicLlavaImagePredictor",
    "DynamicLlavaTextPredictor",
    "DynamicLlavaModelOutputWithPast",
    "DynamicLlavaCausalLMOutputWithPast",
    "SparsitySettings",
]
