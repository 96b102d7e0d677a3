"""KV cache of Dynamic-LLaVA: per layer and per row, only the tokens the predictors kept.

Layers below `sparse_layer` store every (non-padding) token; layers from `sparse_layer` on store only the kept image
tokens, the prompt text and the generated tokens the output-text predictor kept. Rows therefore hold different numbers
of entries, and the two groups of layers differ too.

Storage: each layer owns a preallocated buffer `[batch, kv_heads, capacity, head_dim]`; row `b` holds its entries in
slots `[0, lengths[b])` (left-aligned, original order) and everything behind is scratch. The buffer grows
geometrically (x1.25), so appending is amortised O(1) and never copies the cache per step, and not past
`expected_tokens` (`generate()` sets it to prompt + new tokens: no layer stores more entries than tokens seen). New
room is left uninitialised and zeroed only shortly before attention first reads it (see
`DynamicLlavaLayer.finite_width`). All layers of a group share one `RowLengths` (their decisions are the same), so
the per-row bookkeeping, write slots included, is done once per step, not once per layer; it includes the input
position (attention-mask column) of every stored entry, to map attention weights back to it.

The step protocol (the whole contract between the model and this cache):

1. `layout = cache.begin_step(group, persist)` before the model runs a group of layers. `persist[b, i]` says whether
   current token `i` of row `b` is stored for later steps. The returned `KeyLayout` is everything the model needs to
   build that group's attention mask; the model never reads the cache's internals.
2. The layers' `update` calls, made by transformers' attention modules. They write keys/values but never change the
   stored lengths.
3. `cache.end_step(num_new_tokens)` once the last layer ran: the only place that advances the stored lengths (by what
   each group's `persist` kept) and the count of tokens seen.

Host synchronisations (GPU -> CPU reads), all of them:

- `begin_step` of a multi-token forward (prefill, a chunk), unless the model passes `persist_counts`: one per group,
  whether every row stores all its new tokens (then each layer writes them with a block copy instead of a scatter).
  The model passes them where it knows them from the counts it read before the forward queued device work.
- `end_step`: one per forward, for the per-group minimum/maximum lengths that size the next step's masks and writes.
- `reorder_cache`, `batch_select_indices`, `batch_repeat_interleave` (beam search, sampling with several sequences):
  one per call, for the same minimum/maximum after the rows moved.
- `stored_lengths()` and `sparsity_report()` only when called (reporting).

`update` never synchronises, nor does `begin_step` while decoding: the lengths they need on the host are the ones
`end_step` read.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache


FULL_GROUP = 0
SPARSE_GROUP = 1


@dataclass
class KeyLayout:
    """Where a group of layers finds its keys in the current forward, as `begin_step` returns it.

    `lengths[b]` entries of row `b` are stored (`past_width` = their maximum; `lengths` is None when there is no
    cache), and `positions[b, i]` is the input position of row `b`'s entry `i` (`[batch, past_width]`, None without
    a cache). With `in_place` the single new token sits at column `lengths[b]`; otherwise the new tokens follow the
    `past_width` stored columns.
    """

    lengths: torch.Tensor | None
    past_width: int
    in_place: bool
    uniform: bool  # every row stores `past_width` entries
    positions: torch.Tensor | None = None

    @classmethod
    def empty(cls) -> "KeyLayout":
        """Nothing stored: the layout of a forward without a cache."""
        return cls(lengths=None, past_width=0, in_place=False, uniform=True)


@dataclass
class StepPlan:
    """What the current forward does to a group of layers.

    `persist[b, i]` says whether current token `i` of row `b` is stored for later steps. With `in_place` (one new token
    per row and a non-empty cache) the token is written straight into its row's next free slot and attention reads the
    buffer itself; otherwise attention reads `cat(stored, new)` and the persisted tokens are written compacted.
    `positions[b, i]`: the input position of current token `i` (None: the step's tokens in order).
    `slots` (`[batch, 1, new_tokens, 1]`): the buffer column each new token goes to, computed once for all the
    group's layers; None when every row stores all new tokens behind equally long pasts (a contiguous copy).
    `columns`: how many buffer columns an in-place step of the fixed-capacity cache lets attention read (its window).
    """

    persist: torch.Tensor
    in_place: bool
    positions: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    columns: int | None = None


def storage_rank(persist: torch.Tensor) -> torch.Tensor:
    """`[batch, new_tokens]`: where each new token goes, counted from its row's first free slot. Persisted tokens
    first, in order; the rest behind them, beyond the row's new length (scratch)."""
    return torch.where(
        persist,
        persist.cumsum(-1) - 1,
        persist.sum(-1, keepdim=True) + (~persist).cumsum(-1) - 1,
    )


def stores_every_token(persist: torch.Tensor, persist_counts: list[int] | None) -> bool:
    """`bool(persist.all())`, from the counts where given (no host synchronisation)."""
    if persist_counts is None:
        return bool(persist.all())
    return all(count == persist.shape[1] for count in persist_counts)


class RowLengths:
    """Per-row stored-entry counts of a group of layers, their host-side maximum and minimum, and the input position
    of every stored entry."""

    def __init__(self):
        self.lengths: torch.Tensor | None = None  # LongTensor [batch]
        self.positions: torch.Tensor | None = None  # LongTensor [batch, capacity]: slot -> input position
        self.max_length = 0
        self.min_length = 0
        self.plan: StepPlan | None = None
        self.expected_tokens: int | None = None  # the cache's growth hint (`DynamicLlavaCache.expected_tokens`)

    def advance(self, first_position: int) -> None:
        """Adds what the current step's plan persisted to the lengths (extrema: see `refresh_extrema`) and records
        the persisted tokens' input positions (the plan's, else `first_position` + their index in the step)."""
        persist = self.plan.persist.to(self.lengths.device)
        batch, num_new = persist.shape
        if self.positions is None:
            self.positions = self.lengths.new_zeros(batch, 0)
        needed = self.max_length + num_new
        if needed > self.positions.shape[1]:
            grown = self.positions.new_zeros(batch, _grown_capacity(needed, self.expected_tokens))
            grown[:, : self.positions.shape[1]] = self.positions
            self.positions = grown
        slots = self.lengths[:, None] + storage_rank(persist)
        new_positions = self.plan.positions
        if new_positions is None:
            new_positions = torch.arange(first_position, first_position + num_new, device=persist.device)
        self.positions.scatter_(1, slots, new_positions.to(persist.device).expand(batch, -1))
        self.lengths = self.lengths + persist.sum(-1)
        self.plan = None


def refresh_extrema(groups: list[RowLengths]) -> None:
    """Reads the groups' new minimum and maximum lengths to the host: one synchronisation for all of them."""
    extrema = torch.stack([torch.stack([rows.lengths.min(), rows.lengths.max()]) for rows in groups]).tolist()
    for rows, (low, high) in zip(groups, extrema):
        rows.min_length, rows.max_length = int(low), int(high)


def _grown_capacity(needed: int, expected_tokens: int | None = None) -> int:
    # Geometric growth keeps appends amortised O(1); x1.25 over-allocates by at most a quarter (each growth copies the
    # layer once, about 5x its final size in all). Not past the expected tokens while they suffice.
    capacity = max(needed + needed // 4, 64)
    return capacity if expected_tokens is None or needed > expected_tokens else min(capacity, expected_tokens)


class DynamicLlavaLayer(CacheLayerMixin):
    """One decoder layer's ragged KV storage (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, rows: RowLengths):
        self.key_buffer: torch.Tensor | None = None  # preallocated `[batch, kv_heads, capacity, head_dim]`
        self.value_buffer: torch.Tensor | None = None
        # Columns [0, finite_width) hold written or zeroed entries in every row. Buffers grow uninitialised and are
        # zeroed only just ahead of what attention reads: it reads a ragged row's unused columns too (masked, but a
        # NaN there would still poison the softmax), and headroom nobody reaches is never touched.
        self.finite_width = 0
        super().__init__()
        self.rows = rows
        self.growth_events = 0  # reallocations; each copies this layer's buffer once

    # The public view (what transformers' `Cache` users read): the stored entries only, `[batch, kv_heads, longest
    # row's stored length, head_dim]`; row b's entries are its first `stored_lengths()[layer, b]`, the rest of a
    # shorter row is padding. The buffer behind it, with room to grow, is `key_buffer` / `value_buffer`; assigning
    # `keys` / `values` (as transformers' offloading does) replaces the buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[:, :, : self.rows.max_length]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self.key_buffer = value
        self.finite_width = min(self.finite_width, self.capacity)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[:, :, : self.rows.max_length]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self.value_buffer = value
        self.finite_width = min(self.finite_width, 0 if value is None else value.shape[-2])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        self.key_buffer = key_states.new_zeros(batch, heads, 0, head_dim)
        self.value_buffer = value_states.new_zeros(batch, value_states.shape[1], 0, value_states.shape[-1])
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.key_buffer is None else self.key_buffer.shape[-2]

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = _grown_capacity(needed, self.rows.expected_tokens)
        keys, values = self.key_buffer, self.value_buffer
        grown_keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        grown_values = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
        if self.finite_width > 0:  # the stored entries all lie in these columns
            grown_keys[:, :, : self.finite_width] = keys[:, :, : self.finite_width]
            grown_values[:, :, : self.finite_width] = values[:, :, : self.finite_width]
            self.growth_events += 1
        self.key_buffer, self.value_buffer = grown_keys, grown_values

    def _zero_until(self, width: int) -> None:
        """Makes columns [0, width) finite in every row, zeroing a block ahead so decoding zeroes rarely."""
        if width <= self.finite_width:
            return
        end = min(self.capacity, width + 64)
        self.key_buffer[:, :, self.finite_width : end] = 0
        self.value_buffer[:, :, self.finite_width : end] = 0
        self.finite_width = end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.rows.plan
        if plan is None:
            raise RuntimeError(
                "DynamicLlavaCache was updated outside a DynamicLlava forward: the model must plan each step "
                "(begin_step) before its layers run."
            )
        num_new = key_states.shape[2]
        past_width = self.rows.max_length
        reach = past_width + (1 if plan.in_place else num_new)  # the columns this step writes or reads
        self._ensure_capacity(reach)

        if plan.slots is None:
            # Every row writes columns [past_width, reach) in full: a block copy, and those columns need no zeroing.
            self.key_buffer[:, :, past_width:reach] = key_states
            self.value_buffer[:, :, past_width:reach] = value_states
            self.finite_width = max(self.finite_width, reach)
        else:
            # Ragged rows leave some of these columns unwritten; attention reads them (masked) all the same.
            self._zero_until(reach)
            slots = plan.slots.to(key_states.device)
            self.key_buffer.scatter_(2, slots.expand_as(key_states), key_states)
            self.value_buffer.scatter_(2, slots.expand_as(value_states), value_states)

        if plan.in_place:
            # The new token went to its row's next free slot; whether it stays there is decided in end_step.
            return self.key_buffer[:, :, :reach], self.value_buffer[:, :, :reach]
        if past_width == 0:
            return key_states, value_states
        attend_keys = torch.cat([self.key_buffer[:, :, :past_width], key_states], dim=-2)
        attend_values = torch.cat([self.value_buffer[:, :, :past_width], value_states], dim=-2)
        return attend_keys, attend_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.rows.max_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.rows.max_length

    def get_max_length(self) -> int:
        return -1

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.key_buffer.device)
            self.key_buffer = self.key_buffer[index]
            self.value_buffer = self.value_buffer[index]

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        self.finite_width = 0
        self.is_initialized = False


class DynamicLlavaCache(Cache):
    """Ragged KV cache for Dynamic-LLaVA: layers `< sparse_layer` keep everything, later layers only kept tokens.

    `get_seq_length()` counts the original tokens seen (what `generate()` expects); `stored_lengths()` gives the
    entries actually stored per layer and row, and `sparsity_report()` summarises what was kept.
    """

    layer_class = DynamicLlavaLayer  # the fixed-capacity subclass (static_cache_dynamic_llava.py) swaps both
    rows_class = RowLengths

    def __init__(self, config=None, num_hidden_layers: int | None = None, sparse_layer: int | None = None):
        if config is not None:
            num_hidden_layers = config.get_text_config(decoder=True).num_hidden_layers
            sparse_layer = config.sparse_layer
        if num_hidden_layers is None or sparse_layer is None:
            raise ValueError("DynamicLlavaCache needs a DynamicLlavaConfig, or num_hidden_layers and sparse_layer")
        if not 0 < sparse_layer < num_hidden_layers:
            raise ValueError(f"sparse_layer must be in [1, {num_hidden_layers}), got {sparse_layer}")
        self.sparse_layer = sparse_layer
        self.groups = (self.rows_class(), self.rows_class())
        layers = [
            self.layer_class(self.groups[FULL_GROUP if i < sparse_layer else SPARSE_GROUP])
            for i in range(num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.seen_tokens = 0
        # Per-row (seen, kept) counters behind `sparsity_report()`, by kind: "image" tokens, and "generated" tokens
        # (those fed one at a time after a prefill).
        self.token_counts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def expected_tokens(self) -> int | None:
        """A growth hint: the tokens this cache is expected to see in all (`generate()` sets prompt + new tokens). No
        layer stores more entries than tokens seen, so no buffer grows past it; beyond it, growth goes on as usual."""
        return self.groups[FULL_GROUP].expected_tokens

    @expected_tokens.setter
    def expected_tokens(self, value: int | None) -> None:
        for rows in self.groups:
            rows.expected_tokens = value

    def check_fits(self, config, batch_size: int) -> None:
        """Raises a `ValueError` when this cache was filled for another batch or built for a model whose layers split
        differently; checked before the inputs are read, where such a cache shows up only as confusing counts."""
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if (self.sparse_layer, len(self.layers)) != (config.sparse_layer, num_layers):
            raise ValueError(
                f"This DynamicLlavaCache was built for a model with sparse_layer={self.sparse_layer} and "
                f"{len(self.layers)} layers, but this model has sparse_layer={config.sparse_layer} and {num_layers}: "
                "a cache only works with the model settings it was built for. Pass past_key_values=None (or "
                "DynamicLlavaCache(model.config)) to start a new one."
            )
        if self.batch_size not in (-1, batch_size):
            raise ValueError(
                f"This DynamicLlavaCache holds {self.batch_size} row(s) from an earlier call, but the input has "
                f"{batch_size}: a cache only continues the batch it was filled with. Pass past_key_values=None to "
                "start a new one."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Step protocol used by the model

    def begin_step(
        self,
        group: int,
        persist: torch.Tensor,
        positions: torch.Tensor | None = None,
        persist_counts: list[int] | None = None,
    ) -> KeyLayout:
        """Plans the current forward for one group of layers (`persist`: bool `[batch, new_tokens]`; `positions`:
        their input positions where the model reordered or removed some, `[batch, new_tokens]`) and returns where
        that group's layers will find their keys. `persist_counts`: `persist.sum(-1)` where the model knows it on the
        host (it is read otherwise)."""
        rows = self.groups[group]
        if rows.lengths is None:
            rows.lengths = torch.zeros(persist.shape[0], dtype=torch.long, device=persist.device)
        elif rows.lengths.shape[0] != persist.shape[0]:
            raise ValueError(
                f"The cache holds {rows.lengths.shape[0]} rows but the input has {persist.shape[0]}: pass the cache "
                "back only with the batch it was built for."
            )
        # One new token per row lands in the row's next free slot; several are appended behind the stored ones.
        batch, num_new = persist.shape
        in_place = num_new == 1 and rows.max_length > 0
        if in_place:
            slots = rows.lengths.view(batch, 1, 1, 1)
        elif rows.min_length == rows.max_length and stores_every_token(persist, persist_counts):
            slots = None  # a prefill without padding or drops: each layer copies its new tokens in one block
        else:
            # Persisted tokens first (in order), the rest behind them: beyond the row's new length, i.e. scratch.
            slots = (rows.lengths[:, None] + storage_rank(persist)).view(batch, 1, num_new, 1)
        rows.plan = StepPlan(persist=persist, in_place=in_place, positions=positions, slots=slots)
        return KeyLayout(
            lengths=rows.lengths,
            past_width=rows.max_length,
            in_place=in_place,
            uniform=rows.min_length == rows.max_length,
            positions=None if rows.positions is None else rows.positions[:, : rows.max_length],
        )

    def end_step(self, num_new_tokens: int) -> None:
        """Advances every planned group by what it persisted; one host synchronisation for the whole step."""
        planned = [rows for rows in self.groups if rows.plan is not None]
        for rows in planned:
            rows.advance(self.seen_tokens)
        refresh_extrema(planned)
        self.seen_tokens += num_new_tokens

    def record_tokens(self, kind: str, seen: torch.Tensor, kept: torch.Tensor) -> None:
        """Adds per-row counts of `kind` tokens seen and kept in layers `>= sparse_layer`."""
        if kind in self.token_counts:
            seen, kept = seen + self.token_counts[kind][0], kept + self.token_counts[kind][1]
        self.token_counts[kind] = (seen, kept)

    def group_of(self, layer_idx: int) -> RowLengths:
        return self.groups[FULL_GROUP if layer_idx < self.sparse_layer else SPARSE_GROUP]

    # ----------------------------------------------------------------------------------------------------------------
    # Cache API

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def has_past(self) -> bool:
        """Whether any token was seen (then a one-token forward decodes in place)."""
        return self.seen_tokens > 0

    def step_offset(self) -> int:
        """Tokens seen, as the model offsets the current tokens' input positions by it (the fixed-capacity cache
        returns a device tensor, so that a decoding step reads nothing on the host)."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.group_of(layer_idx).max_length + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True  # exactly: every stored entry's input position is known (see `crop`)

    @property
    def batch_size(self) -> int:
        lengths = self.groups[FULL_GROUP].lengths
        return -1 if lengths is None else lengths.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        """Forgets the last `-tokens_to_remove` tokens seen (a negative count, as transformers passes it when assisted
        decoding rejects candidates). Each group keeps its stored entries from before them, so the cache is exactly
        what those earlier tokens left: tokens removed or not stored then stay so."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self.groups[FULL_GROUP].lengths is None:
            return
        end = max(self.seen_tokens + tokens_to_remove, 0)  # input positions from `end` on are forgotten
        filled = [rows for rows in self.groups if rows.lengths is not None]
        for rows in filled:
            columns = torch.arange(rows.max_length, device=rows.lengths.device)
            stored = columns[None] < rows.lengths[:, None]
            # A row's entries are in input order, so those kept are a prefix; the rest becomes scratch.
            rows.lengths = (stored & (rows.positions[:, : rows.max_length] < end)).sum(-1)
        refresh_extrema(filled)
        self.seen_tokens = end

    def _select_rows(self, index: torch.Tensor) -> None:
        """Keeps/reorders/repeats rows: every layer's storage, the shared lengths and the report counters."""
        filled = [rows for rows in self.groups if rows.lengths is not None]
        for rows in filled:
            rows.lengths = rows.lengths[index.to(rows.lengths.device)]
            if rows.positions is not None:
                rows.positions = rows.positions[index.to(rows.positions.device)]
        if filled:
            refresh_extrema(filled)
        for layer in self.layers:
            layer.select_rows(index)
        self.token_counts = {
            kind: tuple(count[index.to(count.device)] for count in counts)
            for kind, counts in self.token_counts.items()
        }

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.groups[FULL_GROUP].lengths is None:
            return
        index = torch.arange(self.batch_size, device=self.groups[FULL_GROUP].lengths.device)
        self._select_rows(index.repeat_interleave(repeats))

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        for rows in self.groups:
            rows.__init__()
        self.seen_tokens = 0
        self.token_counts = {}

    # ----------------------------------------------------------------------------------------------------------------
    # Reporting

    def stored_lengths(self) -> torch.LongTensor:
        """Stored entries per layer and row, `[num_layers, batch]`."""
        if self.groups[FULL_GROUP].lengths is None:
            return torch.zeros(len(self.layers), 0, dtype=torch.long)
        return torch.stack([self.group_of(i).lengths for i in range(len(self.layers))])

    def growth_events(self) -> int:
        """Buffer reallocations so far, summed over layers (each copies one layer's buffer once)."""
        return sum(layer.growth_events for layer in self.layers)

    def sparsity_report(self) -> list[dict]:
        """Per row: kept/total image tokens, kept/total generated tokens, stored KV bytes vs a dense cache."""
        stored = self.stored_lengths()
        if stored.shape[1] == 0:
            return []
        bytes_per_entry = [
            2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size() if layer.is_initialized else 0
            for layer in self.layers
        ]
        dense_tokens = self.groups[FULL_GROUP].lengths.tolist()
        stored = stored.tolist()
        zeros = [0] * len(dense_tokens)
        counts = {
            kind: [count.tolist() for count in self.token_counts[kind]]
            if kind in self.token_counts
            else [zeros, zeros]
            for kind in ("image", "generated")
        }
        report = []
        for row, dense in enumerate(dense_tokens):
            stored_bytes = sum(stored[layer][row] * size for layer, size in enumerate(bytes_per_entry))
            dense_bytes = dense * sum(bytes_per_entry)
            report.append(
                {
                    "image_tokens_kept": counts["image"][1][row],
                    "image_tokens_total": counts["image"][0][row],
                    "generated_tokens_kept": counts["generated"][1][row],
                    "generated_tokens_total": counts["generated"][0][row],
                    "stored_kv_bytes": stored_bytes,
                    "dense_kv_bytes": dense_bytes,
                    "kv_bytes_ratio": stored_bytes / dense_bytes if dense_bytes else 1.0,
                }
            )
        return report


def cache_for_forward(past_key_values, config, use_cache: bool) -> DynamicLlavaCache | None:
    """The cache a forward reads and fills: the one passed, a new one when none is (or an empty default `DynamicCache`,
    as `generate()` creates), or None without `use_cache`. Other caches cannot hold a ragged history: refused."""
    if past_key_values is None:
        return DynamicLlavaCache(config) if use_cache else None
    if hasattr(past_key_values, "begin_step"):  # duck-typed: remote code loads the cache class separately
        return past_key_values
    if type(past_key_values) is DynamicCache and past_key_values.get_seq_length() == 0:
        return DynamicLlavaCache(config)
    raise TypeError(
        f"Dynamic-LLaVA needs a DynamicLlavaCache (it stores a different set of tokens per layer and row), got "
        f"{type(past_key_values).__name__}. transformers' static, quantized and offloaded caches are not supported; "
        "pass no cache or an empty DynamicCache and one is created (or ask generate() for "
        'cache_implementation="static": DynamicLlavaStaticCache, fixed-capacity and compileable).'
    )


__all__ = ["DynamicLlavaCache", "DynamicLlavaLayer", "KeyLayout", "cache_for_forward"]
