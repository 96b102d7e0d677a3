"""Dynamic-LLaVA: LLaVA-1.5 with learned vision/text context sparsification (Huang et al., ICLR 2025).

The model runs the text backbone's decoder layers in its own loop so that, at the input of `sparse_layer`, it can
physically remove image tokens (top-k per image by the image predictor, or by a random or FastV-style baseline
selector) and gate which generated tokens enter the KV cache of the later layers (output-text predictor). In training
nothing is removed: the predictors sample hard Gumbel-softmax keep masks with straight-through gradients, applied as
key masks in the layers `>= sparse_layer`.
Everything else is transformers' Llava.
"""

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMode
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import logging

from .cache_dynamic_llava import FULL_GROUP, SPARSE_GROUP, DynamicLlavaCache, KeyLayout
from .configuration_dynamic_llava import (
    DynamicLlavaConfig,
    check_keep_rate,
    check_non_negative_int,
    check_vision_selector,
)


logger = logging.get_logger(__name__)


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
        # The predictor may be kept in float32 while the decoder runs in float16 (`_keep_in_fp32_modules`).
        x = self.down_mlp(image_hidden_states.to(self.down_mlp[0].weight.dtype))
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
        # The predictor may be kept in float32 while the decoder runs in float16 (`_keep_in_fp32_modules`).
        return self.output_mlp(hidden_states.to(self.output_mlp[0].weight.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Per-call sparsification settings


@dataclass(frozen=True)
class SparsitySettings:
    """What a forward/generate call sparsifies. Pass `sparsity=` to `forward` or `generate` to override the config:
    `False` switches everything off, a dict overrides single fields (e.g. `{"vision_keep_rate": 0.5}`).

    `vision_selector` picks how image tokens are kept when `use_vision_predictor` is on: `"learned"` (the image
    predictor), `"random"` (seeded by `vision_selector_seed`) or `"fastv"` (attention received at `sparse_layer`); see
    [`DynamicLlavaModel.image_token_scores`]. Only `"learned"` needs the image predictor."""

    use_vision_predictor: bool
    vision_keep_rate: float
    use_output_text_predictor: bool
    use_instruct_predictor: bool
    vision_selector: str = "learned"
    vision_selector_seed: int = 0

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
    check_vision_selector(settings.vision_selector)
    check_non_negative_int("vision_selector_seed", settings.vision_selector_seed)
    for flag, module in (
        ("use_vision_predictor", "image_score_predictor"),
        ("use_output_text_predictor", "output_text_score_predictor"),
        ("use_instruct_predictor", "instruct_score_predictor"),
    ):
        needed = getattr(settings, flag) and (flag != "use_vision_predictor" or settings.vision_selector == "learned")
        if needed and getattr(model, module) is None:
            hint = ' (or pick vision_selector="random" or "fastv")' if module == "image_score_predictor" else ""
            raise ValueError(
                f"{flag}=True needs the {module}, which this model does not have: it was built with "
                f"config.{flag}=False. Rebuild/convert the model with the predictor to use it{hint}."
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
    training_keep_masks (`TrainingKeepMasks`, *optional*):
        The hard straight-through keep masks sampled in a training forward (`model.train()`).
    """

    image_hidden_states: torch.Tensor | None = None
    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.BoolTensor | None = None
    training_keep_masks: "TrainingKeepMasks | None" = None


@dataclass
class DynamicLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    Same as [`~transformers.models.llava.modeling_llava.LlavaCausalLMOutputWithPast`]. `logits` stay aligned with the
    input positions; positions removed at `sparse_layer` get zero logits.

    kept_image_token_indices (`list[torch.LongTensor]`, *optional*):
        See [`DynamicLlavaModelOutputWithPast`].
    output_keep_decisions (`torch.BoolTensor`, *optional*):
        See [`DynamicLlavaModelOutputWithPast`].
    lm_loss (`torch.FloatTensor`, *optional*):
        In training with `labels`: the language-modeling cross-entropy alone. `loss` adds `mask_loss_weight` times
        the keep-rate losses below.
    image_mask_loss, output_text_mask_loss, instruct_mask_loss (`torch.FloatTensor`, *optional*):
        Keep-rate losses of a training forward: per mask, the squared gap between the target keep rate and the
        realised keep ratio, averaged over images (image) or rows (text). `None` when that predictor did not run.
    image_keep_ratio, output_text_keep_ratio, instruct_keep_ratio (`torch.FloatTensor`, *optional*):
        Realised keep ratios of a training forward, for logging (text: over the rows long enough to be sparsified).
    """

    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.BoolTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    image_mask_loss: torch.FloatTensor | None = None
    output_text_mask_loss: torch.FloatTensor | None = None
    instruct_mask_loss: torch.FloatTensor | None = None
    image_keep_ratio: torch.FloatTensor | None = None
    output_text_keep_ratio: torch.FloatTensor | None = None
    instruct_keep_ratio: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Attention masks built from the cache layout (transformers' mask helpers cannot express a ragged cache)


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
# Training: straight-through keep masks applied as key masks (nothing is removed)

IGNORE_INDEX = -100
# log(keep + KEEP_FLOOR) is the additive key bias of the masked softmax: 0 for kept keys, about -23 for dropped ones.
# A dropped key then weighs 1e-10 of its unmasked weight (the official masked softmax leaks eps=1e-6 similarly), and
# d bias / d keep = 1 / (keep + KEEP_FLOOR) makes the gradient to a dropped key's mask exactly the method's
# e_ij / sum_k(e_ik keep_k) (v_j - out_i) term, through the standard sdpa/eager kernels.
KEEP_FLOOR = 1e-10


@dataclass
class TrainingKeepMasks:
    """Hard 0/1 keep masks (straight-through gradients) sampled at `sparse_layer` in a training forward.

    `image`: `[num_images, tokens_per_image]`. `output_text` / `instruct`: `[batch, max_span]` over each row's answer
    (the supervised tokens of the last assistant reply) / last instruction, zero past the row's span length
    (`*_lengths`, `[batch]`). Rows shorter than the config's `*_len_for_training` get all-ones masks (no gradient).
    """

    image: torch.Tensor | None = None
    output_text: torch.Tensor | None = None
    output_text_lengths: torch.LongTensor | None = None
    instruct: torch.Tensor | None = None
    instruct_lengths: torch.LongTensor | None = None

    @property
    def sampled(self) -> bool:
        return self.image is not None or self.output_text is not None or self.instruct is not None


def training_spans(
    labels: torch.LongTensor | None, valid: torch.Tensor, image_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[batch, seq]` masks of each row's answer and last instruction, as in the official training code.

    The answer is the trailing run of supervised tokens (labels != -100) of the row; the last instruction is the text
    between the end of the previous supervised run (or of the row's last image) and the answer. Rows without an image
    have no instruction span (their prompt is never pruned).
    """
    columns = torch.arange(valid.shape[1], device=valid.device)
    supervised = valid & (labels != IGNORE_INDEX) if labels is not None else torch.zeros_like(valid)
    prompt = valid & ~supervised
    last_prompt_token = torch.where(prompt, columns, -1).amax(-1, keepdim=True)
    answer = supervised & (columns > last_prompt_token)
    previous_reply_end = torch.where(supervised & (columns < last_prompt_token), columns, -1).amax(-1, keepdim=True)
    last_image = torch.where(image_mask, columns, -1).amax(-1, keepdim=True)
    start = torch.maximum(previous_reply_end, last_image)
    instruction = prompt & ~image_mask & (columns > start) & (last_image >= 0)
    return answer, instruction


def float16_attention(hidden_states: torch.Tensor) -> bool:
    device = hidden_states.device.type
    autocast_float16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    return hidden_states.dtype == torch.float16 or autocast_float16


def build_training_attention_mask(key_keep: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive `[batch, 1, seq, seq]` mask of the method's masked softmax for layers `>= sparse_layer`.

    Causal and padding entries are masked; every other key gets `log(keep + KEEP_FLOOR)`, so gradients reach the
    keep mask; a query always sees itself whatever its own keep value.
    """
    seq = key_keep.shape[1]
    device = key_keep.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    itself = torch.eye(seq, dtype=torch.bool, device=device)
    key_bias = torch.log(key_keep.float() + KEEP_FLOOR)[:, None, :]
    bias = torch.where(itself, torch.zeros((), device=device), key_bias).to(dtype)
    allowed = (causal[None] & valid[:, None, :]) | itself
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def keep_rate_loss(
    masks: torch.Tensor, lengths: torch.Tensor, target: float, min_length: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean over rows of (target - realised keep ratio)^2; rows shorter than `min_length` count as 0 (METHOD §5.3).

    Returns the loss and the realised keep ratio over the rows that count (None if none does).
    """
    ratios = masks.sum(-1) / lengths.clamp(min=1)
    counted = lengths >= max(min_length, 1)
    loss = torch.where(counted, (target - ratios) ** 2, torch.zeros_like(ratios)).mean()
    realised = ratios[counted].mean().detach() if bool(counted.any()) else None
    return loss, realised


# ---------------------------------------------------------------------------------------------------------------------
# Decisions at the sparse layer (inference)


def keep_decision(logits: torch.Tensor) -> torch.Tensor:
    """Keep iff logit_keep > logit_drop (strict), as in the official inference code."""
    return logits[..., 0] > logits[..., 1]


def image_token_coordinates(
    image_mask: torch.Tensor, tokens_per_image: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Row and column of every image's tokens, images in row order then position order: two
    `[num_images, tokens_per_image]` tensors."""
    coordinates = image_mask.nonzero()
    return coordinates[:, 0].view(-1, tokens_per_image), coordinates[:, 1].view(-1, tokens_per_image)


def select_image_tokens(
    scores: torch.Tensor, image_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, keep_rate: float
) -> tuple[torch.Tensor, list[torch.LongTensor]]:
    """Keeps the top-k tokens of each image by `scores` (`[num_images, tokens_per_image]`), k =
    floor(tokens_per_image * keep_rate); shared by every vision selector.

    Returns the `[batch, seq]` mask of dropped image tokens and, per row, the kept indices into the row's image
    tokens (ascending).
    """
    num_images, tokens_per_image = scores.shape
    kept = scores.topk(int(tokens_per_image * keep_rate), dim=-1).indices.sort(dim=-1).values  # [num_images, k]

    keep_image_token = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
    dropped = torch.zeros_like(image_mask)
    dropped[rows, cols] = ~keep_image_token

    # Indices into each row's image tokens: image j of a row starts at j * tokens_per_image.
    images_per_row = (image_mask.sum(-1) // tokens_per_image).tolist()
    first_image_of_row = torch.tensor([0] + images_per_row[:-1], device=kept.device).cumsum(0)
    image_rank_in_row = torch.arange(num_images, device=kept.device) - first_image_of_row[rows[:, 0]]
    row_indices = (kept + image_rank_in_row[:, None] * tokens_per_image).split(images_per_row)
    return dropped, [indices.reshape(-1) for indices in row_indices]


def instruction_queries(image_mask: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]`: the queries whose attention ranks a row's image tokens for `"fastv"`: the row's prompt tokens
    after its last image, or its last prompt token if none follows; none in rows without an image."""
    columns = torch.arange(prompt.shape[1], device=prompt.device)
    last_image = torch.where(image_mask, columns, -1).amax(-1, keepdim=True)
    has_image = last_image >= 0
    after_image = prompt & (columns > last_image) & has_image
    last_prompt_token = (columns == torch.where(prompt, columns, -1).amax(-1, keepdim=True)) & has_image
    return torch.where(after_image.any(-1, keepdim=True), after_image, last_prompt_token)


# ---------------------------------------------------------------------------------------------------------------------
# The tokens of one forward, and the decisions taken about them at the sparse layer


@dataclass
class SparseLayerPlan:
    """What happens to the current tokens at `sparse_layer`, as the predictors decide it.

    `removed`: physically dropped from the layers `>= sparse_layer` in this forward. `unstored`: computed in this
    forward but not stored in those layers' cache (a later turn's pruned text, a generated token the output-text
    predictor dropped).
    """

    valid: torch.Tensor
    removed: torch.Tensor
    unstored: torch.Tensor
    removes_tokens: bool = False  # some decision removes tokens, so the later layers run on a gathered sequence
    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.Tensor | None = None

    @classmethod
    def keep_all(cls, valid: torch.Tensor) -> "SparseLayerPlan":
        return cls(valid=valid, removed=torch.zeros_like(valid), unstored=torch.zeros_like(valid))

    def remove(self, tokens: torch.Tensor) -> None:
        self.removed = self.removed | tokens
        self.removes_tokens = True

    def skip_storing(self, tokens: torch.Tensor) -> None:
        self.unstored = self.unstored | tokens

    @property
    def persist(self) -> torch.Tensor:
        """`[batch, new_tokens]`: tokens whose K/V the layers `>= sparse_layer` store for later steps."""
        return self.valid & ~self.removed & ~self.unstored

    @property
    def keep_computing(self) -> torch.Tensor | None:
        """`[batch, new_tokens]`: tokens that continue into the layers `>= sparse_layer` (None: all of them)."""
        if not self.removes_tokens:
            return None
        keep = self.valid & ~self.removed
        keep[:, -1] = True  # the last token's logits are always needed
        return keep


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


@dataclass
class DecoderStep:
    """The tokens of one forward on their way through the decoder layers.

    What the input is: `valid` (`[batch, new_tokens]`, not padding), `past_seen` (tokens already in the cache),
    `num_generated_tokens` (without a cache: trailing inputs that are model outputs), and, once the images are merged,
    `image_mask` (their placeholders) and `tokens_per_image` (None without images).

    Where the tokens are: until `sparse_layer` every input position has a slot. `apply(plan)` then keeps only the
    tokens the later layers compute, left-aligned in their original order (`gather_index` holds each slot's input
    position). `visible` marks the slots later tokens may attend to, `persist` those whose K/V the cache stores.
    """

    valid: torch.Tensor
    past_seen: int
    num_generated_tokens: int
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    image_mask: torch.Tensor | None = None
    tokens_per_image: int | None = None
    all_hidden_states: list[torch.Tensor] | None = None
    gather_index: torch.Tensor | None = None
    visible: torch.Tensor = field(init=False)
    persist: torch.Tensor = field(init=False)

    def __post_init__(self):
        if self.image_mask is None:
            self.image_mask = torch.zeros_like(self.valid)
        self.visible = self.persist = self.valid

    @property
    def num_new(self) -> int:
        return self.valid.shape[1]

    @property
    def decoding(self) -> bool:
        """One new token after a cached prefix."""
        return self.num_new == 1 and self.past_seen > 0

    @property
    def prompt(self) -> torch.Tensor:
        """`[batch, new_tokens]`: the valid tokens that are not generated outputs (those trail the prompt)."""
        columns = torch.arange(self.num_new, device=self.valid.device)
        return self.valid & (columns < self.num_new - self.num_generated_tokens)

    def apply(self, plan: SparseLayerPlan) -> None:
        """Takes the sparse layer's decisions: what the cache stores and, if tokens are removed, which slots remain."""
        self.persist = plan.persist
        keep = plan.keep_computing
        if keep is None:
            return
        kept_counts = keep.sum(-1)
        width = int(kept_counts.max())
        # Kept tokens first, in their original order (a stable sort of "removed" flags).
        self.gather_index = torch.sort(~keep, dim=-1, stable=True).indices[:, :width]
        self.visible = torch.arange(width, device=keep.device)[None] < kept_counts[:, None]
        self.persist = torch.gather(self.persist, 1, self.gather_index) & self.visible
        self.hidden_states = gather_tokens(self.hidden_states, self.gather_index)
        cos, sin = self.position_embeddings
        self.position_embeddings = (gather_tokens(cos, self.gather_index), gather_tokens(sin, self.gather_index))

    def scatter(self, states: torch.Tensor) -> torch.Tensor:
        """`states` of the slots back at the input positions; removed positions get zeros."""
        return scatter_tokens(states, self.gather_index, self.visible, self.num_new)

    def record_hidden_states(self) -> None:
        if self.all_hidden_states is not None:
            self.all_hidden_states.append(self.scatter(self.hidden_states))


# ---------------------------------------------------------------------------------------------------------------------
# Models


# What a saved folder's config.json names as remote code, so it loads with `trust_remote_code=True` where this package
# is not installed. transformers only writes the entry of the class being saved, so all of them are set explicitly.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_dynamic_llava.DynamicLlavaConfig",
    "AutoModel": "modeling_dynamic_llava.DynamicLlavaModel",
    "AutoModelForImageTextToText": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
}


class DynamicLlavaPreTrainedModel(LlavaPreTrainedModel):
    config_class = DynamicLlavaConfig
    # The ragged cache and the data-dependent pruning rule out static shapes, BlockMasks and external backends.
    _can_compile_fullgraph = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # Never weight-quantised: every quantizer (bitsandbytes 8/4-bit, torchao, ...) adds these to its
    # `modules_to_not_convert`, even when the user passes their own skip list. The predictors' keep/drop decisions
    # compare two close logits, and the vision tower and projector are small next to the decoder. transformers also
    # keeps them in float32 when a model is loaded in float16 (not bfloat16). Listed for the ForConditionalGeneration
    # ("model." prefix) and the bare model.
    _keep_in_fp32_modules = tuple(
        prefix + name
        for prefix in ("model.", "")
        for name in (
            "vision_tower",
            "multi_modal_projector",
            "image_score_predictor",
            "output_text_score_predictor",
            "instruct_score_predictor",
        )
    )

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `_auto_class` (set below) makes transformers copy this file, its relative imports and the config file next
        # to the weights; the full auto_map makes every Auto class resolve them.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


class DynamicLlavaModel(DynamicLlavaPreTrainedModel, LlavaModel):
    """Llava backbone whose decoder loop prunes image tokens and gates the KV cache at `sparse_layer`."""

    # Temperature of the training-time Gumbel-softmax; `GumbelTemperatureCallback` anneals it from 1.0 to 0.1.
    gumbel_tau: float = 1.0

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

    def check_inputs(self, input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, output_attentions) -> None:
        if output_attentions:
            raise ValueError("output_attentions is not supported by Dynamic-LLaVA (its layers see pruned sequences)")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")

    def check_training_call(self, settings: SparsitySettings, with_cache: bool, inputs_embeds: torch.Tensor) -> None:
        """A training forward (model.train() with sparsification on) samples keep masks; refuse what cannot work."""
        if with_cache:
            raise ValueError(
                "A training forward (model.train() with sparsification on) samples keep masks instead of removing "
                "tokens and cannot use a KV cache: pass use_cache=False, or call model.eval() for inference."
            )
        if settings.use_vision_predictor and settings.vision_selector != "learned":
            raise ValueError(
                f"vision_selector={settings.vision_selector!r} is an inference-time baseline: a training forward "
                "(model.train() with sparsification on) samples the image predictor's Gumbel keep masks. Pass "
                'sparsity={"vision_selector": "learned"} to train, or call model.eval() to run the baseline.'
            )
        if self.config.text_config._attn_implementation.startswith("flash_attention"):
            raise ValueError(
                "Training Dynamic-LLaVA needs the masked softmax of the method, an additive float mask that flash "
                "attention cannot take: load the model with attn_implementation='sdpa' (or 'eager') for training."
            )
        if float16_attention(inputs_embeds):
            logger.warning_once(
                "Training Dynamic-LLaVA in float16: dropped tokens' attention weights (~1e-10 of their unmasked "
                "value) underflow, so their keep masks get no gradient through attention. Train in bfloat16 or "
                "float32."
            )

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

    def resolve_cache(self, past_key_values, use_cache: bool | None) -> tuple[DynamicLlavaCache | None, bool]:
        """The cache this forward reads and fills (None: none), and the resolved `use_cache`."""
        if use_cache is None:
            use_cache = self.config.text_config.use_cache and not self.training
        if past_key_values is None:
            return (DynamicLlavaCache(self.config) if use_cache else None), use_cache
        if hasattr(past_key_values, "begin_step"):  # duck-typed: remote code loads the cache class separately
            return past_key_values, use_cache
        if type(past_key_values) is DynamicCache and past_key_values.get_seq_length() == 0:
            return DynamicLlavaCache(self.config), use_cache  # an empty default cache, e.g. created by generate()
        raise TypeError(
            f"Dynamic-LLaVA needs a DynamicLlavaCache (it stores a different set of tokens per layer and row), got "
            f"{type(past_key_values).__name__}. Static, quantized and offloaded caches are not supported; pass no "
            "cache or an empty DynamicCache and one is created."
        )

    # -----------------------------------------------------------------------------------------------------------------
    # Phases of the forward

    def start_step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: DynamicLlavaCache | None,
        num_generated_tokens: int,
    ) -> DecoderStep:
        """The step state at the first decoder layer: padding mask, original positions and their RoPE."""
        past_seen = cache.get_seq_length() if cache is not None else 0
        if num_generated_tokens and past_seen > 0:
            raise ValueError("num_generated_tokens is for decoding without a cache; with a cache pass only new tokens")
        batch, num_new = inputs_embeds.shape[:2]
        device = inputs_embeds.device
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
        return DecoderStep(
            valid=valid,
            past_seen=past_seen,
            num_generated_tokens=num_generated_tokens,
            hidden_states=inputs_embeds,
            position_embeddings=self.language_model.rotary_emb(inputs_embeds, position_ids),
        )

    def embed_images(
        self,
        step: DecoderStep,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.FloatTensor | None,
        mm_encoder_outputs: dict | None,
        **vision_kwargs,
    ) -> list[torch.Tensor] | None:
        """Encodes the images (unless `mm_encoder_outputs` holds them) and merges them into the step's placeholders
        (setting `image_mask` and `tokens_per_image`); returns the image features.

        A placeholder id the model generated itself (a decoding step, or the output part of a no-cache step) is an
        ordinary token, as in Llava.
        """
        if not step.decoding:
            step.image_mask = self.image_token_mask(input_ids, step.hidden_states)
        if step.num_generated_tokens:
            step.image_mask[:, step.num_new - step.num_generated_tokens :] = False
        image_features = None
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            image_features = mm_encoder_outputs["image"].pooler_output
        elif pixel_values is not None:
            self.check_pixel_values(pixel_values)
            image_features = self.get_image_features(
                pixel_values=pixel_values, return_dict=True, **vision_kwargs
            ).pooler_output
        if image_features is not None:
            step.hidden_states, step.tokens_per_image = self.merge_image_features(
                step.hidden_states, step.image_mask, image_features
            )
        elif not step.decoding and bool(step.image_mask.any()):
            raise ValueError(
                f"The input contains {int(step.image_mask.sum())} image tokens (id {self.config.image_token_id}) but "
                "no pixel_values or image features were given."
            )
        return image_features

    def layer_groups(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """The text backbone's decoder layers below `sparse_layer` and from it on."""
        layers = self.language_model.layers[: self.config.text_config.num_hidden_layers]
        return layers[: self.config.sparse_layer], layers[self.config.sparse_layer :]

    def run_layers(
        self,
        layers: nn.ModuleList,
        group: int,
        step: DecoderStep,
        cache: DynamicLlavaCache | None,
        key_keep: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        """Runs one group of decoder layers (`FULL_GROUP` below `sparse_layer`, `SPARSE_GROUP` from it) over the
        step's slots. `key_keep`: the training keep values of the keys (a training forward's later layers)."""
        layout = cache.begin_step(group, step.persist) if cache is not None else KeyLayout.empty()
        dtype = step.hidden_states.dtype
        if key_keep is not None:
            mask = build_training_attention_mask(key_keep, step.visible, dtype)
        else:
            mask = build_attention_mask(self.config.text_config._attn_implementation, layout, step.visible, dtype)
        for layer in layers:
            step.hidden_states = layer(
                step.hidden_states,
                attention_mask=mask,
                position_embeddings=step.position_embeddings,
                past_key_values=cache,
                **kwargs,
            )
            step.record_hidden_states()

    # -----------------------------------------------------------------------------------------------------------------
    # Decisions at the sparse layer (inference)

    def plan_sparse_layer(self, step: DecoderStep, settings: SparsitySettings) -> SparseLayerPlan:
        """Applies the predictors to the input of `sparse_layer` and decides what the later layers see and store."""
        plan = SparseLayerPlan.keep_all(step.valid)
        if not settings.enabled:
            return plan
        if settings.use_vision_predictor and step.tokens_per_image is not None:
            self.prune_image_tokens(plan, step, settings)
        if settings.use_instruct_predictor:
            self.prune_instruction(plan, step)
        if settings.use_output_text_predictor and (step.num_generated_tokens > 1 or step.decoding):
            self.gate_output_text(plan, step)
        return plan

    def prune_image_tokens(self, plan: SparseLayerPlan, step: DecoderStep, settings: SparsitySettings) -> None:
        """Keeps the top `vision_keep_rate` of each image's tokens by the selector's scores; removes the rest."""
        rows, cols = image_token_coordinates(step.image_mask, step.tokens_per_image)
        scores = self.image_token_scores(
            settings,
            step.hidden_states,
            rows,
            cols,
            image_mask=step.image_mask,
            prompt=step.prompt,
            valid=step.valid,
            position_embeddings=step.position_embeddings,
        )
        dropped, plan.kept_image_token_indices = select_image_tokens(
            scores, step.image_mask, rows, cols, settings.vision_keep_rate
        )
        plan.remove(dropped)

    def prune_instruction(self, plan: SparseLayerPlan, step: DecoderStep) -> None:
        """Drops the prompt text the instruct predictor rejects (never the last prompt token)."""
        instruct_keep = keep_decision(self.instruct_score_predictor(step.hidden_states))
        columns = torch.arange(step.num_new, device=step.valid.device)
        prompt_end = step.num_new - step.num_generated_tokens
        text = step.valid & ~step.image_mask & (columns < prompt_end - 1)
        if step.past_seen > 0:
            # A later turn: its tokens see each other now; only the kept ones are stored.
            plan.skip_storing(text & ~instruct_keep)
        else:
            # Prompt text after each row's last image is pruned like the image tokens.
            last_image = torch.where(step.image_mask, columns, -1).amax(-1, keepdim=True)
            after_image = (columns > last_image) & (last_image >= 0)
            plan.remove(text & after_image & ~instruct_keep)

    def gate_output_text(self, plan: SparseLayerPlan, step: DecoderStep) -> None:
        """Keeps a generated token's K/V for later steps iff the output-text predictor says so."""
        output_keep = keep_decision(self.output_text_score_predictor(step.hidden_states))
        if step.past_seen > 0:
            # Decoding with a cache: the new token sees itself now and is stored only if kept.
            plan.skip_storing(~output_keep)
            plan.output_keep_decisions = output_keep
        else:
            # Decoding without a cache: earlier generated tokens the predictor dropped are gone; the newest one is
            # being computed and stays.
            columns = torch.arange(step.num_new, device=step.valid.device)
            prompt_end = step.num_new - step.num_generated_tokens
            judged = (columns >= prompt_end) & (columns < step.num_new - 1)
            plan.remove(judged & ~output_keep)
            plan.output_keep_decisions = output_keep[:, prompt_end:]

    def image_token_scores(
        self,
        settings: SparsitySettings,
        hidden_states: torch.Tensor,
        rows: torch.LongTensor,
        cols: torch.LongTensor,
        *,
        image_mask: torch.Tensor,
        prompt: torch.Tensor,
        valid: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """`[num_images, tokens_per_image]` keep scores of each image's tokens (higher is kept first).

        `hidden_states` is the input of `sparse_layer`; `rows`/`cols` locate each image's tokens (see
        `image_token_coordinates`); `prompt` marks the valid prompt tokens (not padding, not generated outputs). By
        `settings.vision_selector`:

        - `"learned"`: the image predictor's log-softmax keep score (the method).
        - `"random"`: uniform random scores from a CPU `torch.Generator` seeded with `vision_selector_seed`, one row
          per image in batch order; the same seed keeps the same tokens of the same batch.
        - `"fastv"`: training-free, FastV-style: the attention each image token receives in `sparse_layer`, recomputed
          from that layer's queries and keys (see `attention_received`), so it works with any attention
          implementation. FastV averages over heads and all queries; we average over heads and the row's text queries
          that follow its last image (the instruction, which sees every image token), falling back to the row's last
          prompt token. That avoids the causal bias towards early image tokens, which more queries can see. Only
          prompt tokens query, so decoding without a cache keeps the same tokens as the cached prefill; with a cache,
          the keys are the current forward's tokens (a later turn's new image is ranked without the past).
        """
        if settings.vision_selector == "learned":
            logits = self.image_score_predictor(hidden_states[rows, cols])
            return torch.log_softmax(logits.float(), dim=-1)[..., 0]
        if settings.vision_selector == "random":
            generator = torch.Generator().manual_seed(settings.vision_selector_seed)
            return torch.rand(rows.shape, generator=generator).to(rows.device)
        queries = instruction_queries(image_mask, prompt)
        return self.attention_received(hidden_states, valid, queries, position_embeddings)[rows, cols]

    def attention_received(
        self,
        hidden_states: torch.Tensor,
        valid: torch.Tensor,
        queries: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """`[batch, seq]`: attention each token receives in `sparse_layer` from its row's `queries` (`[batch, seq]`
        bool), averaged over heads and those queries (0 in rows without queries).

        Recomputed from the layer's own weights: `input_layernorm`, `q_proj`/`k_proj`, RoPE, kv heads repeated for
        GQA, scaled dot products under the causal and padding masks, softmax over keys in float32. Memory:
        `[batch, heads, max queries per row, seq]`.
        """
        layer = self.language_model.layers[self.config.sparse_layer]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden_states)
        head_shape = (*normed.shape[:2], -1, attention.head_dim)
        query = attention.q_proj(normed).view(head_shape).transpose(1, 2)
        key = attention.k_proj(normed).view(head_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        key = key.repeat_interleave(attention.num_key_value_groups, dim=1)

        # Each row's queries, left-aligned: positions [batch, width] (slots past a row's count are unused).
        num_queries = queries.sum(-1)
        width = int(num_queries.max())
        positions = torch.sort(~queries, dim=-1, stable=True).indices[:, :width]
        used = torch.arange(width, device=queries.device)[None] < num_queries[:, None]
        query = torch.gather(query, 2, positions[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))

        logits = (query.float() @ key.float().transpose(-1, -2)) * attention.scaling  # [batch, heads, width, seq]
        columns = torch.arange(valid.shape[1], device=valid.device)
        allowed = ((columns <= positions[..., None]) & valid[:, None, :]) | (columns == positions[..., None])
        weights = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        weights = torch.where(used[:, None, :, None], weights, 0.0)
        return weights.sum(dim=(1, 2)) / (num_queries * weights.shape[1]).clamp(min=1)[:, None]

    # -----------------------------------------------------------------------------------------------------------------
    # Decisions at the sparse layer (training)

    def sample_keep_mask(self, logits: torch.Tensor, kind: str) -> torch.Tensor:
        """Hard 0/1 keep mask `[...]` from `[..., 2]` keep/drop logits: Gumbel-softmax at temperature `gumbel_tau`
        with straight-through gradients. `kind` ("image", "output_text", "instruct") says which predictor ran."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return F.gumbel_softmax(log_probs, tau=self.gumbel_tau, hard=True)[..., 0]

    def sample_span_masks(
        self, hidden_states: torch.Tensor, span: torch.Tensor, predictor: nn.Module, kind: str, min_length: int
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]:
        """Keep masks over each row's span (left-aligned, `[batch, max_span]`), its lengths and its positions."""
        lengths = span.sum(-1)
        width = int(lengths.max())
        positions = torch.sort(~span, dim=-1, stable=True).indices[:, :width]
        in_span = torch.arange(width, device=span.device)[None] < lengths[:, None]
        masks = self.sample_keep_mask(predictor(gather_tokens(hidden_states, positions)), kind) * in_span
        # Spans too short to sparsify are kept whole, without gradient to the predictor.
        too_short = (lengths < min_length)[:, None]
        masks = torch.where(too_short, in_span.to(masks.dtype), masks)
        return masks, lengths, positions

    def sample_training_masks(
        self, step: DecoderStep, labels: torch.LongTensor | None, settings: SparsitySettings
    ) -> tuple[TrainingKeepMasks, torch.Tensor | None]:
        """Samples the keep masks of a training forward; returns them and the `[batch, seq]` key keep values (None
        when no mask was sampled: the later layers then run like inference without pruning)."""
        config = self.config
        hidden_states, image_mask, valid = step.hidden_states, step.image_mask, step.valid
        masks = TrainingKeepMasks()
        key_keep = torch.ones(valid.shape, dtype=torch.float32, device=valid.device)

        if settings.use_vision_predictor and step.tokens_per_image is not None:
            rows, cols = image_token_coordinates(image_mask, step.tokens_per_image)
            masks.image = self.sample_keep_mask(self.image_score_predictor(hidden_states[rows, cols]), "image")
            key_keep = key_keep.index_put((rows.reshape(-1), cols.reshape(-1)), masks.image.reshape(-1))

        answer, instruction = training_spans(labels, valid, image_mask)
        spans = []
        if settings.use_output_text_predictor and bool(answer.any()):
            spans.append(
                ("output_text", answer, self.output_text_score_predictor, config.output_text_len_for_training)
            )
        if settings.use_instruct_predictor and bool(instruction.any()):
            spans.append(("instruct", instruction, self.instruct_score_predictor, config.instruct_len_for_training))
        for kind, span, predictor, min_length in spans:
            span_masks, lengths, positions = self.sample_span_masks(hidden_states, span, predictor, kind, min_length)
            setattr(masks, kind, span_masks)
            setattr(masks, f"{kind}_lengths", lengths)
            # Slots past a row's span point at positions outside it: write back what is already there.
            in_span = torch.arange(positions.shape[1], device=positions.device)[None] < lengths[:, None]
            values = torch.where(in_span, span_masks, torch.gather(key_keep, 1, positions))
            key_keep = key_keep.scatter(1, positions, values)
        return masks, key_keep if masks.sampled else None

    def decide_at_sparse_layer(
        self,
        step: DecoderStep,
        settings: SparsitySettings,
        training: bool,
        labels: torch.LongTensor | None,
        cache: DynamicLlavaCache | None,
    ) -> tuple[SparseLayerPlan, TrainingKeepMasks | None, torch.Tensor | None]:
        """The plan for the layers `>= sparse_layer`, plus (training) the sampled keep masks and the key keep values.

        A training forward removes nothing: its keep masks act on the keys of the later layers instead.
        """
        if training:
            masks, key_keep = self.sample_training_masks(step, labels, settings)
            return SparseLayerPlan.keep_all(step.valid), masks, key_keep
        plan = self.plan_sparse_layer(step, settings)
        if cache is not None:
            # Seen/kept counts behind the cache's `sparsity_report()`.
            if step.tokens_per_image is not None:
                image_tokens = step.image_mask & step.valid
                cache.record_tokens("image", image_tokens.sum(-1), (step.image_mask & plan.persist).sum(-1))
            if step.decoding:
                cache.record_tokens("generated", step.valid.sum(-1), plan.persist.sum(-1))
        return plan, None, None

    def finish_step(self, step: DecoderStep, cache: DynamicLlavaCache | None) -> torch.Tensor:
        """Final norm, every input position back in place (removed ones get zeros); the cache advances its lengths."""
        hidden_states = step.scatter(self.language_model.norm(step.hidden_states))
        if step.all_hidden_states is not None:
            step.all_hidden_states[-1] = hidden_states  # transformers' convention: the last entry is normed
        if cache is not None:
            cache.end_step(step.num_new)
        return hidden_states

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
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DynamicLlavaModelOutputWithPast | tuple:
        r"""
        sparsity (`SparsitySettings`, `dict` or `bool`, *optional*):
            This call's sparsification instead of the config's: `False` switches it off (plain LLaVA), a dict overrides
            fields of [`SparsitySettings`], e.g. `{"vision_selector": "fastv", "vision_keep_rate": 0.2}`.
        num_generated_tokens (`int`, *optional*, defaults to 0):
            Without a cache: the last `num_generated_tokens` inputs are model outputs, pruned by the output-text
            predictor as cached decoding would (the newest is always computed). `generate(use_cache=False)` sets it.
        labels (`torch.LongTensor`, *optional*):
            In training only: each row's last reply (its supervised tokens) is what the output-text predictor masks.
        """
        settings = resolve_sparsity(self, sparsity)
        self.check_inputs(input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, output_attentions)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        cache, use_cache = self.resolve_cache(past_key_values, use_cache)
        training = self.training and settings.enabled
        if training:
            self.check_training_call(settings, cache is not None, inputs_embeds)

        step = self.start_step(inputs_embeds, attention_mask, position_ids, cache, num_generated_tokens)
        image_features = self.embed_images(
            step,
            input_ids,
            pixel_values,
            mm_encoder_outputs,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
        )
        if output_hidden_states or (output_hidden_states is None and self.config.output_hidden_states):
            step.all_hidden_states = [step.hidden_states]

        # Layers below sparse_layer see the whole sequence and store every real token.
        below, above = self.layer_groups()
        self.run_layers(below, FULL_GROUP, step, cache, use_cache=use_cache, **kwargs)

        # At sparse_layer: decide what the later layers compute and store, or (training) sample the masks they apply.
        plan, training_keep_masks, key_keep = self.decide_at_sparse_layer(step, settings, training, labels, cache)
        step.apply(plan)

        # Layers from sparse_layer on, over the remaining tokens; then the norm, and every input position back.
        self.run_layers(above, SPARSE_GROUP, step, cache, key_keep, use_cache=use_cache, **kwargs)
        hidden_states = self.finish_step(step, cache)

        output = DynamicLlavaModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(step.all_hidden_states) if step.all_hidden_states is not None else None,
            image_hidden_states=torch.stack(list(image_features)) if image_features is not None else None,
            kept_image_token_indices=plan.kept_image_token_indices,
            output_keep_decisions=plan.output_keep_decisions,
            training_keep_masks=training_keep_masks,
        )
        return output if return_dict is not False else output.to_tuple()


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
            labels=labels,
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
        if outputs.training_keep_masks is not None:
            self.add_keep_rate_losses(output, outputs.training_keep_masks, sparsity)
        return output if return_dict is not False else output.to_tuple()

    def add_keep_rate_losses(
        self, output: DynamicLlavaCausalLMOutputWithPast, masks: TrainingKeepMasks, sparsity
    ) -> None:
        """Adds `mask_loss_weight` x the keep-rate losses of a training forward to `output.loss` (METHOD.md §5.3) and
        records the separate terms and the realised keep ratios."""
        config = self.config
        settings = resolve_sparsity(self.model, sparsity)
        mask_loss = None
        if masks.image is not None:
            lengths = torch.full(masks.image.shape[:1], masks.image.shape[1], device=masks.image.device)
            output.image_mask_loss, output.image_keep_ratio = keep_rate_loss(
                masks.image, lengths, settings.vision_keep_rate, 0
            )
            mask_loss = output.image_mask_loss
        for kind, target, min_length in (
            ("output_text", config.output_text_keep_rate, config.output_text_len_for_training),
            ("instruct", config.instruct_keep_rate, config.instruct_len_for_training),
        ):
            if getattr(masks, kind) is None:
                continue
            term, ratio = keep_rate_loss(getattr(masks, kind), getattr(masks, f"{kind}_lengths"), target, min_length)
            setattr(output, f"{kind}_mask_loss", term)
            setattr(output, f"{kind}_keep_ratio", ratio)
            mask_loss = term if mask_loss is None else mask_loss + term
        if output.loss is not None and mask_loss is not None:
            output.lm_loss = output.loss
            output.loss = output.loss + config.mask_loss_weight * mask_loss

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


DynamicLlavaConfig.register_for_auto_class()
DynamicLlavaModel.register_for_auto_class("AutoModel")
DynamicLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlavaPreTrainedModel",
    "DynamicLlavaImagePredictor",
    "DynamicLlavaTextPredictor",
    "DynamicLlavaModelOutputWithPast",
    "DynamicLlavaCausalLMOutputWithPast",
    "SparsitySettings",
    "TrainingKeepMasks",
]
