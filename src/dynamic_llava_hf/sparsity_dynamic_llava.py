"""What Dynamic-LLaVA sparsifies in a call, and the state of one forward's tokens around `sparse_layer`.

Shared by the inference decisions (`inference_dynamic_llava.py`), the training decisions (`training_dynamic_llava.py`)
and the decoder loop (`modeling_dynamic_llava.py`). Part of the remote-code bundle: imports only torch, transformers
and its sibling files.
"""

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from .cache_dynamic_llava import KeyLayout
from .configuration_dynamic_llava import FIELD_CHECKS, validate_sparsity_settings


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

    def __post_init__(self):
        # The same checks as the config's fields: a per-call {"use_vision_predictor": "no"} is an error, not a truthy
        # string, and numpy/0-d tensor rates become floats.
        for name in SETTING_NAMES:
            object.__setattr__(self, name, FIELD_CHECKS[name](name, getattr(self, name)))

    @classmethod
    def from_config(cls, config) -> "SparsitySettings":
        return cls(**{name: getattr(config, name) for name in SETTING_NAMES})

    def replace(self, **changes) -> "SparsitySettings":
        """A copy with `changes` (`dataclasses.replace`, in a form `torch.compile` traces)."""
        return SparsitySettings(**{**{name: getattr(self, name) for name in SETTING_NAMES}, **changes})

    @classmethod
    def off(cls) -> "SparsitySettings":
        return cls(False, 1.0, False, False)

    @property
    def enabled(self) -> bool:
        return self.use_vision_predictor or self.use_output_text_predictor or self.use_instruct_predictor


# The field names, read once here: `dataclasses.fields` cannot run inside a compiled forward.
SETTING_NAMES = tuple(item.name for item in dataclasses.fields(SparsitySettings))


def default_settings(model) -> SparsitySettings:
    """What a call without `sparsity=` runs: the config's settings, except that while the learned predictors are
    untrained (`config.predictors_trained=False`) an inference call leaves them out, so it equals plain LLaVA (a
    training-free `vision_selector` still prunes). A training forward uses them: it is what trains them."""
    settings = SparsitySettings.from_config(model.config)
    if model.config.predictors_trained or model.training:
        return settings
    return settings.replace(
        use_vision_predictor=settings.use_vision_predictor and settings.vision_selector != "learned",
        use_output_text_predictor=False,
        use_instruct_predictor=False,
    )


def resolve_sparsity(model, sparsity) -> SparsitySettings:
    """Turns the `sparsity` argument into settings, checking that the predictors it needs exist.

    None: the model's default (`default_settings`); True: the config's settings, learned predictors included even if
    untrained; False: nothing; a dict: the default with those fields replaced."""
    # The config may have been changed since the model was built (e.g. `model.config.sparse_layer = 99`).
    validate_sparsity_settings(model.config)
    if sparsity is None:
        settings = default_settings(model)
    elif sparsity is True:
        settings = SparsitySettings.from_config(model.config)
    elif sparsity is False:
        return SparsitySettings.off()
    elif isinstance(sparsity, SparsitySettings):
        settings = sparsity
    elif isinstance(sparsity, dict):
        known = set(SETTING_NAMES)
        unknown = set(sparsity) - known
        if unknown:
            raise ValueError(f"Unknown sparsity setting(s) {sorted(unknown)}; valid ones are {sorted(known)}")
        settings = default_settings(model).replace(**sparsity)
    else:
        raise TypeError(
            f"sparsity must be None, True, False, a dict or a SparsitySettings, got {type(sparsity).__name__}"
        )
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
# The tokens of one forward


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
    # Known on the host without a read: the valid tokens removed per row (None: some decision did not say), and
    # whether no decision skipped storing.
    removed_counts: list[int] | None = None
    stores_all: bool = True

    @classmethod
    def keep_all(cls, valid: torch.Tensor) -> "SparseLayerPlan":
        nothing = torch.zeros_like(valid)
        return cls(valid=valid, removed=nothing, unstored=nothing, removed_counts=[0] * valid.shape[0])

    def remove(self, tokens: torch.Tensor, counts: list[int] | None = None) -> None:
        """Removes `tokens`; `counts`: how many valid ones that is per row, where the caller knows it on the host."""
        self.removed = self.removed | tokens
        self.removes_tokens = True
        known = counts is not None and self.removed_counts is not None
        self.removed_counts = [a + b for a, b in zip(self.removed_counts, counts)] if known else None

    def skip_storing(self, tokens: torch.Tensor) -> None:
        self.unstored = self.unstored | tokens
        self.stores_all = False

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


def image_token_coordinates(
    image_mask: torch.Tensor, tokens_per_image: int, num_tokens: int | None = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Row and column of every image's tokens, images in row order then position order: two
    `[num_images, tokens_per_image]` tensors. `num_tokens`, the number of image tokens if known on the host, spares
    `nonzero` its host synchronisation (it must read how many there are)."""
    if num_tokens is None:
        coordinates = image_mask.nonzero()
    else:
        coordinates = torch.nonzero_static(image_mask, size=num_tokens)
    return coordinates[:, 0].view(-1, tokens_per_image), coordinates[:, 1].view(-1, tokens_per_image)


@dataclass
class InputCounts:
    """Per-row counts of a forward's inputs, read to the host at once before the forward queues device work.

    A read of a device value waits for all work queued before it: in the middle of a GPU prefill (behind the vision
    tower, or a group of layers) it stalls the host until the GPU is done, and the GPU then idles while the host
    prepares the next launches. From these counts the model derives, without reading again, what it needs on the host
    later in the forward: the image tokens per row, and after pruning the kept tokens per row (mask shapes, block
    copies into the cache)."""

    valid: list[int]  # non-padding tokens
    image_tokens: list[int]  # image placeholders
    # Every image placeholder is a valid token and every row ends in a valid text token (kept, never pruned): then the
    # tokens kept after image pruning are known from the counts alone.
    predictable: bool

    @classmethod
    def read(cls, valid: torch.Tensor, image_mask: torch.Tensor) -> "InputCounts":
        """One host synchronisation."""
        regular = (valid[:, -1] & ~image_mask[:, -1]).all() & ~(image_mask & ~valid).any()
        counts = torch.cat([valid.sum(-1), image_mask.sum(-1), regular.long()[None]]).tolist()
        batch = valid.shape[0]
        return cls(valid=counts[:batch], image_tokens=counts[batch : 2 * batch], predictable=bool(counts[-1]))


@dataclass
class DecoderStep:
    """The tokens of one forward on their way through the decoder layers.

    What the input is: `valid` (`[batch, new_tokens]`, not padding), `past_seen` (tokens already in the cache),
    `num_generated_tokens` (without a cache: trailing inputs that are model outputs), `prefill` (prompt tokens even if
    only one follows a cached prefix: a chunk of a chunked prefill), and, once the images are merged, `image_mask`
    (their placeholders) and `tokens_per_image` (None without images).

    Where the tokens are: until `sparse_layer` every input position has a slot. `apply(plan)` then keeps only the
    tokens the later layers compute, left-aligned in their original order (`gather_index` holds each slot's input
    position). `visible` marks the slots later tokens may attend to, `persist` those whose K/V the cache stores.

    With `counts` (see `read_counts`) the host also knows, without a read, whether every slot is visible
    (`visible_all`) and how many slots each row persists (`persist_counts`); None where it does not.
    """

    valid: torch.Tensor
    past_seen: "int | torch.Tensor"
    num_generated_tokens: int
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    image_mask: torch.Tensor | None = None
    tokens_per_image: int | None = None
    all_hidden_states: list[torch.Tensor | None] | None = None
    hidden_states_selection: set[int] | None = None  # indices of the hidden states to return (None: all)
    all_attentions: list[torch.Tensor] | None = None
    gather_index: torch.Tensor | None = None
    prefill: bool = False
    has_past: bool = False  # the cache holds tokens (`past_seen > 0`, known on the host)
    split_images: bool = False  # the input holds only part of some image (a prefill chunk cut through it)
    counts: InputCounts | None = None
    visible: torch.Tensor = field(init=False)
    persist: torch.Tensor = field(init=False)
    visible_all: bool | None = field(init=False, default=None)
    persist_counts: list[int] | None = field(init=False, default=None)

    def __post_init__(self):
        if self.image_mask is None:
            self.image_mask = torch.zeros_like(self.valid)
        self.visible = self.persist = self.valid

    def read_counts(self) -> None:
        """Reads the input's `counts` (one host synchronisation): the model does it before the vision tower runs."""
        self.counts = InputCounts.read(self.valid, self.image_mask)
        self.visible_all = all(count == self.num_new for count in self.counts.valid)
        self.persist_counts = self.counts.valid

    def image_token_coordinates(self) -> tuple[torch.LongTensor, torch.LongTensor]:
        """`image_token_coordinates` of this step's images, without a host read where the counts are known."""
        num_tokens = None if self.counts is None else sum(self.counts.image_tokens)
        return image_token_coordinates(self.image_mask, self.tokens_per_image, num_tokens)

    def clear_image_tokens(self) -> None:
        """Placeholders without images are ordinary tokens (as in Llava)."""
        self.image_mask = torch.zeros_like(self.image_mask)
        if self.counts is not None:
            self.counts.image_tokens = [0] * len(self.counts.image_tokens)

    @property
    def num_new(self) -> int:
        return self.valid.shape[1]

    @property
    def decoding(self) -> bool:
        """One new generated token after a cached prefix."""
        return self.num_new == 1 and self.has_past and not self.prefill

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
            self.persist_counts = self.persist_counts if plan.stores_all else None
            return
        kept_counts = keep.sum(-1)
        kept_on_host = self.kept_counts_on_host(plan)
        width = max(kept_on_host) if kept_on_host is not None else int(kept_counts.max())
        # Kept tokens first, in their original order (a stable sort of "removed" flags).
        self.gather_index = torch.sort(~keep, dim=-1, stable=True).indices[:, :width]
        self.visible = torch.arange(width, device=keep.device)[None] < kept_counts[:, None]
        self.persist = torch.gather(self.persist, 1, self.gather_index) & self.visible
        # Every kept token is valid when the counts are predictable, so a row persists all it keeps unless told not to.
        self.visible_all = None if kept_on_host is None else all(count == width for count in kept_on_host)
        self.persist_counts = kept_on_host if plan.stores_all else None
        self.hidden_states = gather_tokens(self.hidden_states, self.gather_index)
        cos, sin = self.position_embeddings
        self.position_embeddings = (gather_tokens(cos, self.gather_index), gather_tokens(sin, self.gather_index))

    def kept_counts_on_host(self, plan: SparseLayerPlan) -> list[int] | None:
        """The tokens each row keeps computing after `plan` (`plan.keep_computing.sum(-1)`) where the counts and the
        plan tell it without a read: the valid tokens minus the removed ones (the last token, which is always kept, is
        a valid text token, so it is among them)."""
        if self.counts is None or not self.counts.predictable or plan.removed_counts is None:
            return None
        return [valid - removed for valid, removed in zip(self.counts.valid, plan.removed_counts)]

    def scatter(self, states: torch.Tensor) -> torch.Tensor:
        """`states` of the slots back at the input positions; removed positions get zeros."""
        return scatter_tokens(states, self.gather_index, self.visible, self.num_new)

    def record_hidden_states(self) -> None:
        """Appends the current hidden states at the input positions (None where `output_hidden_states` selected
        other indices, as transformers does)."""
        if self.all_hidden_states is None:
            return
        selection = self.hidden_states_selection
        selected = selection is None or len(self.all_hidden_states) in selection
        self.all_hidden_states.append(self.scatter(self.hidden_states) if selected else None)

    def slot_positions(self) -> torch.Tensor | None:
        """`[batch, slots]`: each slot's input position (past tokens, then this step's); None while every input
        position has its own slot."""
        return None if self.gather_index is None else self.past_seen + self.gather_index

    def key_positions(self, layout: KeyLayout) -> torch.Tensor:
        """`[batch, keys]`: the input position (attention-mask column: past tokens, then this step's) of every key a
        group's attention reads in this step, as laid out by `layout`; `past_seen + num_new` (one past the last) for
        keys that stand for no token (a ragged row's unused columns, slots of removed tokens)."""
        batch, device = self.valid.shape[0], self.valid.device
        nowhere = int(self.past_seen) + self.num_new
        current = self.slot_positions()
        if current is None:
            current = self.past_seen + torch.arange(self.num_new, device=device)[None].expand(batch, -1)
        current = torch.where(self.visible, current.to(device), nowhere)
        if layout.lengths is None or layout.past_width == 0:
            return current
        columns = torch.arange(layout.past_width + int(layout.in_place), device=device)[None]
        lengths = layout.lengths.to(device)[:, None]
        stored = torch.where(
            columns < lengths, F.pad(layout.positions.to(device), (0, int(layout.in_place)), value=nowhere), nowhere
        )
        if layout.in_place:  # the new token sits in its row's next free column
            return torch.where(columns == lengths, current, stored)
        return torch.cat([stored, current], dim=-1)

    def keys_at_input_positions(self, key_positions: torch.Tensor) -> bool:
        """Whether every query and every key of this step is at its input position (nothing removed, padded or left
        out of the cache): attention weights then need no mapping. One host synchronisation, once per group."""
        total = int(self.past_seen) + self.num_new
        if self.gather_index is not None or key_positions.shape[1] != total:
            return False
        return torch.equal(key_positions, torch.arange(total, device=key_positions.device).expand_as(key_positions))

    def record_attentions(self, weights: torch.Tensor, key_positions: torch.Tensor | None) -> None:
        """Appends one layer's attention weights (`[batch, heads, slots, keys]`, as attention read them) mapped to
        the input positions, `[batch, heads, new_tokens, past + new_tokens]`: zeros for removed queries and for keys
        that were removed or are not stored. `key_positions` None: every key is at its input position
        (`keys_at_input_positions`), and the weights are kept as computed, the same tensor, so that gradients reach
        them (as in Llava)."""
        if key_positions is None:
            self.all_attentions.append(weights)
            return
        batch, heads, _, num_keys = weights.shape
        total = int(self.past_seen) + self.num_new
        index = key_positions[:, None, None, :].expand(batch, heads, weights.shape[2], num_keys)
        # One spare column receives the keys that stand for no token; it is cut off.
        by_key = weights.new_zeros(batch, heads, weights.shape[2], total + 1).scatter_(-1, index, weights)[..., :total]
        by_query = self.scatter(by_key.transpose(1, 2).flatten(2))  # [batch, new_tokens, heads * total]
        self.all_attentions.append(by_query.view(batch, self.num_new, heads, total).transpose(1, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Attention masks built from the cache layout (transformers' mask helpers cannot express a ragged cache)


def takes_key_mask(attn_implementation: str) -> bool:
    """Whether an attention implementation takes a 2D key mask (flash attention, which applies causality itself),
    as transformers decides: the mask function it registered for the name is flash attention's. The Hub's flash
    kernels count too: `attn_implementation="kernels-community/flash-attn3"` registers its repo name with flash
    attention's mask when the kernel loads."""
    masks = ALL_MASK_ATTENTION_FUNCTIONS
    return attn_implementation in masks and masks[attn_implementation] is masks["flash_attention_2"]


def build_attention_mask(
    attn_implementation: str,
    layout: KeyLayout,
    visible: torch.Tensor,
    dtype: torch.dtype,
    visible_all: bool | None = None,
) -> torch.Tensor | None:
    """Mask for one group of layers.

    A query attends to its row's stored entries, to earlier current tokens that are `visible` (not padding, not
    removed), and always to itself. Returns a bool `[B, 1, q, kv]` mask for sdpa, an additive float one for eager, a
    2D key mask for flash attention (which applies causality itself), or None where none is needed. `visible_all`:
    `bool(visible.all())` where the host knows it (else it is read).
    """
    batch, num_new = visible.shape
    device = visible.device
    flash = takes_key_mask(attn_implementation)

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
        everything_valid = (layout.past_width == 0 or layout.uniform) and (
            visible_all if visible_all is not None else bool(visible.all())
        )
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
