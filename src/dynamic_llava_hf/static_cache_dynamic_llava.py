"""Fixed-capacity KV cache of Dynamic-LLaVA: the same tokens as `DynamicLlavaCache`, in buffers sized for the worst
case, so that a decoding step has static shapes and never synchronises with the host (`torch.compile`-able).

What is stored is exactly what the dynamic cache stores, in the same slots: per layer group and row, entries
left-aligned in original order (layers `< sparse_layer` every real token, later layers the kept prompt tokens and the
generated tokens the output-text predictor kept). The difference is the room around them and what lives on the host:

- Each group's buffers hold `capacity` columns, fixed when the cache first sees tokens (a prefill): the longest row's
  stored entries after that forward plus every token still to come up to `max_cache_len` (all of them could be
  kept), rounded up to a multiple of `capacity_step` so that calls of similar lengths share a compiled step. Layers
  `< sparse_layer` therefore hold about prompt + new tokens, later layers kept prompt + new tokens. A multi-token
  forward that needs more, or a later turn for which `generate()` raised `max_cache_len`, grows them (eagerly, before
  its layers run); a decoding step of the current generation never does (it cannot look at the lengths).
- A decoding step (one new token after a cached prefix) writes each row's token into the row's next free slot, lets
  attention read the buffer's first `window` columns under a key mask built on the device from the per-row lengths
  (`slot <= length`: the stored entries and the token itself), and advances the lengths on the device by the keep
  decision. The lengths, the input position of every slot and the count of tokens seen are tensors updated in place;
  nothing in the step reads them on the host, and no shape depends on them.
- The window is planned on the host, before the step and outside compiled code (`generate()` calls
  `plan_decoding_step`): on a GPU from a bound that needs no synchronisation (the longest row after the last
  multi-token forward plus one entry per decoding step since), on the CPU from the lengths themselves (reading them
  there costs nothing). So attention reads about what the rows hold instead of the worst case; a decoding step is
  memory-bound, and fewer bytes read is time saved. The window reaches the step as a tensor whose length dynamo treats
  as dynamic: every size runs the same compiled graph. On a GPU it takes only a few sizes per generation
  (`window_buckets`), because CUDA graphs record one graph per size; on the CPU it is exact. A step nobody planned (a
  forward called by hand) reads every column.
- The host-side extrema of the lengths (`max_length`, used by multi-token forwards and the public `keys` view) are
  read lazily, one synchronisation when next needed.

`generate(..., cache_implementation="static")` builds this cache (with `max_cache_len` from the generation length);
`generate()` then compiles the decoding step when given a `compile_config`. Multi-token forwards (prefill, chunks,
later turns) run as with the dynamic cache, with its host synchronisations.
"""

import torch

from .cache_dynamic_llava import (
    DynamicLlavaCache,
    DynamicLlavaLayer,
    KeyLayout,
    RowLengths,
    StepPlan,
    refresh_extrema,
    storage_rank,
)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tells dynamo that these tensors keep their address (they are updated in place), as transformers' StaticLayer
    does; needed for CUDA graphs. Skipped while tracing."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


class StaticRowLengths(RowLengths):
    """`RowLengths` of a group with fixed-capacity buffers: lengths and positions are updated in place, and the
    host-side extrema are read only when asked for (after a decoding step they are stale)."""

    read_lengths_on_host = True  # plan windows from the lengths themselves when they are in CPU memory

    def __init__(self):
        self.stale = False
        self.capacity = 0  # columns of every buffer of the group (and of `positions`)
        self.reserved_for = 0  # the cache's `max_cache_len` when `capacity` was last checked
        # The read window (host-side, see `plan_window`): the longest row's stored entries after the last multi-token
        # forward (None: unknown), decoding steps planned since, and the step count by which the window grows.
        self.window_base: int | None = None
        self.window_steps = 0
        self.window_quantum = 1
        # The next decoding step's window, as a tensor whose length is the columns it reads (None: all `capacity`): a
        # dimension that dynamo treats as dynamic, so that every window size runs the same compiled graph.
        self.window: torch.Tensor | None = None
        self.column_ids: torch.Tensor | None = None  # arange(capacity), whose prefixes are the windows
        super().__init__()

    def _fresh(self) -> "StaticRowLengths":
        if self.stale:
            refresh_extrema([self])  # sets min_length, then max_length (which clears `stale`)
        return self

    @property
    def max_length(self) -> int:
        return self._fresh()._max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        self._max_length, self.stale = value, False

    @property
    def min_length(self) -> int:
        return self._fresh()._min_length

    @min_length.setter
    def min_length(self, value: int) -> None:
        self._min_length = value

    def reserve(self, capacity: int) -> None:
        """Makes `positions` (and, through `capacity`, every layer of the group) at least `capacity` columns wide."""
        if capacity <= self.capacity:
            return
        grown = self.lengths.new_zeros(self.lengths.shape[0], capacity)
        if self.positions is not None:
            grown[:, : self.positions.shape[1]] = self.positions
        self.positions, self.capacity = grown, capacity
        self.column_ids = torch.arange(capacity, device=self.lengths.device)
        _mark_static(self.positions)

    def start_window(self, stored: int, still_to_come: int, buckets: int, min_quantum: int) -> None:
        """After a multi-token forward: `stored` is the longest row's entries, `still_to_come` the most decoding steps
        left; the window takes at most `buckets` sizes over them, growing by at least `min_quantum` columns."""
        self.window_base, self.window_steps, self.window = stored, 0, None
        self.window_quantum = max(-(-still_to_come // buckets), min_quantum)

    def plan_window(self) -> None:
        """Before a decoding step, on the host: the columns it must read, i.e. up to the new token's column in the
        longest row. Where the lengths live in host memory (CPU) reading them is free: the window is exactly that, and
        follows what the rows really store (kept tokens only). On a GPU it comes from a bound instead, `window_base +
        steps planned so far` (each step adds at most one entry per row), rounded up to the next multiple of
        `window_quantum`: a few distinct sizes per generation, one CUDA graph each."""
        if self.window_base is None:
            self.window = None
            return
        self.window_steps += 1
        if self.lengths.device.type == "cpu" and self.read_lengths_on_host:
            # Exact: no CUDA graphs here, so a new size costs nothing (the compiled graph takes any length).
            columns = self.max_length + 1
        else:
            columns = self.window_base + _round_up(self.window_steps, self.window_quantum)
        self.window = self.column_ids[: min(columns, self.capacity)]
        if self.window.shape[0] > 1:  # (dynamo specialises sizes 0 and 1 anyway)
            torch._dynamo.maybe_mark_dynamic(self.window, 0)

    def take_window(self) -> int:
        """In a decoding step: the planned window, once; an unplanned step reads every column, and leaves the host
        without a bound on the lengths until the next multi-token forward."""
        if self.window is None:
            self.window_base = None
            return self.capacity
        window, self.window = self.window.shape[0], None
        return window

    def advance(self, first_position) -> None:
        """As `RowLengths.advance`, in place and without reading anything on the host (`first_position` may be a
        device tensor)."""
        persist = self.plan.persist.to(self.lengths.device)
        batch, num_new = persist.shape
        slots = self.lengths[:, None] + storage_rank(persist)
        new_positions = self.plan.positions
        if new_positions is None:
            new_positions = first_position + torch.arange(num_new, device=persist.device)
        rows = torch.arange(batch, device=slots.device)[:, None]
        self.positions[rows, slots] = new_positions.to(persist.device).expand(batch, -1)  # in place (not scatter_)
        self.lengths.add_(persist.sum(-1))
        self.plan = None
        self.stale = True


class DynamicLlavaStaticLayer(DynamicLlavaLayer):
    """One decoder layer's fixed-capacity storage: the group's `capacity` columns, zero-filled, written in place."""

    is_compileable = True

    def _ensure_capacity(self, needed: int) -> None:
        capacity = max(needed, self.rows.capacity)
        if capacity <= self.capacity:
            return
        keys, values = self.key_buffer, self.value_buffer
        grown_keys = keys.new_zeros(*keys.shape[:2], capacity, keys.shape[-1])
        grown_values = values.new_zeros(*values.shape[:2], capacity, values.shape[-1])
        if self.capacity > 0:
            grown_keys[:, :, : self.capacity] = keys
            grown_values[:, :, : self.capacity] = values
            self.growth_events += 1
        self.key_buffer, self.value_buffer = grown_keys, grown_values
        self.finite_width = capacity  # zero-filled: every column is finite
        _mark_static(self.key_buffer, self.value_buffer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        plan = self.rows.plan
        if plan is None or not plan.in_place:
            return super().update(key_states, value_states, *args, **kwargs)
        # A decoding step: the token goes to its row's next free slot; attention reads all `capacity` columns under
        # the key mask (`slot <= length`), so the shapes never change.
        self._ensure_capacity(self.rows.capacity)  # grown only where a one-token later turn reserved more
        # An indexed assignment, not `scatter_`: inductor updates the buffer in place for the former but copies the
        # whole buffer for the latter (measured: ~120 ms per step for 470 MB of buffers on one CPU core).
        slots = plan.slots.view(-1).to(key_states.device)
        rows = torch.arange(slots.shape[0], device=slots.device)
        self.key_buffer[rows, :, slots] = key_states[:, :, 0]
        self.value_buffer[rows, :, slots] = value_states[:, :, 0]
        return self.key_buffer[:, :, : plan.columns], self.value_buffer[:, :, : plan.columns]

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized and index.shape[0] == self.key_buffer.shape[0]:
            index = index.to(self.key_buffer.device)  # a reorder: in place, the buffers keep their address
            self.key_buffer.copy_(self.key_buffer[index])
            self.value_buffer.copy_(self.value_buffer[index])
        else:
            super().select_rows(index)
            if self.is_initialized:
                _mark_static(self.key_buffer, self.value_buffer)


class DynamicLlavaStaticCache(DynamicLlavaCache):
    """`DynamicLlavaCache` in fixed-capacity buffers (see the module docstring): compileable decoding steps.

    `max_cache_len`: the most tokens (prompt + generated, padding included) the cache will see; `generate()` passes its
    generation length (and raises it when the cache is passed back). Decoding past it fails with an index error, as
    with transformers' StaticCache: a decoding step cannot look at the lengths to grow the buffers. `capacity_step`:
    capacities are rounded up to a multiple of it. `window_buckets`: on a GPU, the most read-window sizes per
    generation (all run one compiled graph; with CUDA graphs each size is recorded once); the window grows by at least
    `capacity_step` columns at a time. On the CPU the window is exact (one column past the longest row).
    """

    layer_class = DynamicLlavaStaticLayer
    rows_class = StaticRowLengths

    def __init__(
        self,
        config=None,
        max_cache_len: int | None = None,
        num_hidden_layers: int | None = None,
        sparse_layer: int | None = None,
        capacity_step: int = 64,
        window_buckets: int = 8,
    ):
        self.seen = None  # LongTensor []: tokens seen, on the cache's device (`seen_tokens` reads it)
        self._has_past = False  # host-side, set by the first forward: nothing in a decoding step reads the count
        super().__init__(config, num_hidden_layers=num_hidden_layers, sparse_layer=sparse_layer)
        if max_cache_len is None or max_cache_len < 1:
            raise ValueError(
                f"DynamicLlavaStaticCache needs max_cache_len >= 1 (prompt + new tokens), got {max_cache_len}"
            )
        if window_buckets < 1:
            raise ValueError(f"DynamicLlavaStaticCache needs window_buckets >= 1, got {window_buckets}")
        self.max_cache_len = max_cache_len
        self.capacity_step = capacity_step
        self.window_buckets = window_buckets

    # Tokens seen live on the device; the host-side count is read on demand.
    @property
    def seen_tokens(self) -> int:
        return 0 if self.seen is None else int(self.seen)

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        if self.seen is not None:
            self.seen.fill_(value)
        self._has_past = value > 0

    @property
    def has_past(self) -> bool:
        return self._has_past

    def step_offset(self):
        return self.seen if self.seen is not None else 0

    @property
    def is_compileable(self) -> bool:
        return True

    def reserve(self, max_cache_len: int) -> None:
        """Makes room for `max_cache_len` tokens seen in all, from the next forward on (generate() calls it before
        a later turn's prefill, where growing the buffers may synchronise)."""
        self.max_cache_len = max(self.max_cache_len, max_cache_len)

    def _start(self, persist: torch.Tensor) -> None:
        """First tokens: the per-row state, on the input's device, including the report counters (so that decoding
        steps only update tensors that exist)."""
        batch, device = persist.shape[0], persist.device
        for rows in self.groups:
            rows.lengths = torch.zeros(batch, dtype=torch.long, device=device)
            _mark_static(rows.lengths)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        self.token_counts = {kind: (zeros.clone(), zeros.clone()) for kind in ("image", "generated")}
        _mark_static(self.seen, *(count for counts in self.token_counts.values() for count in counts))

    def begin_step(
        self,
        group: int,
        persist: torch.Tensor,
        positions: torch.Tensor | None = None,
        persist_counts: list[int] | None = None,
    ) -> KeyLayout:
        rows = self.groups[group]
        if rows.lengths is None:
            self._start(persist)
        batch, num_new = persist.shape
        if rows.lengths.shape[0] != batch:
            return super().begin_step(group, persist, positions)  # refuses it
        decoding = num_new == 1 and self.has_past
        if not decoding or self.max_cache_len > rows.reserved_for:  # (a one-token later turn may need room too)
            self._reserve_for(rows, persist, persist_counts)
        if not decoding:
            return super().begin_step(group, persist, positions, persist_counts)
        # A decoding step: nothing read on the host; shapes fixed by the capacity, but for the planned window's
        # length (dynamic in a compiled step).
        slots = rows.lengths.view(batch, 1, 1, 1)
        columns = rows.take_window()
        rows.plan = StepPlan(persist=persist, in_place=True, positions=positions, slots=slots, columns=columns)
        width = columns - 1
        return KeyLayout(
            lengths=rows.lengths, past_width=width, in_place=True, uniform=False, positions=rows.positions[:, :width]
        )

    def plan_decoding_step(self) -> None:
        """Called by `generate()` before each forward, outside any compiled code: plans the next decoding step's read
        window of every group (see `StaticRowLengths.plan_window`). A hand-written decoding loop may call it before
        each forward too; without it a step reads the whole buffers."""
        if self.has_past:
            for rows in self.groups:
                rows.plan_window()

    def _reserve_for(self, rows: StaticRowLengths, persist: torch.Tensor, persist_counts: list[int] | None) -> None:
        """Before a multi-token forward (host synchronisations allowed): room for its writes, and for every token
        still to come up to `max_cache_len` on top of what the rows store after it."""
        num_new = persist.shape[1]
        if persist_counts is not None and rows.max_length == 0:  # nothing stored yet (a prefill): no read needed
            stored_after = max(persist_counts)
        else:
            stored_after = int((rows.lengths + persist.to(rows.lengths.device).sum(-1)).max())
        # Tokens this forward feeds: the first group's count (the later group's may be fewer, after pruning).
        first_plan = self.groups[0].plan
        fed = first_plan.persist.shape[1] if first_plan is not None else num_new
        seen = self.seen_tokens if self.has_past else 0  # (reading the device count waits for the queued work)
        still_to_come = max(self.max_cache_len - (seen + fed), 0)
        needed = max(rows.max_length + num_new, stored_after + still_to_come, 1)
        rows.reserve(_round_up(needed, self.capacity_step))
        rows.reserved_for = self.max_cache_len
        rows.start_window(stored_after, still_to_come, self.window_buckets, self.capacity_step)

    def end_step(self, num_new_tokens: int) -> None:
        """Advances the planned groups and the count of tokens seen, on the device only."""
        for rows in self.groups:
            if rows.plan is not None:
                rows.advance(self.seen)
        self.seen.add_(num_new_tokens)
        self._has_past = True

    def record_tokens(self, kind: str, seen: torch.Tensor, kept: torch.Tensor) -> None:
        total_seen, total_kept = self.token_counts[kind]
        total_seen.add_(seen.to(total_seen.device))
        total_kept.add_(kept.to(total_kept.device))

    def _select_rows(self, index: torch.Tensor) -> None:
        """Keeps/reorders/repeats rows; the extrema are read when next needed, not now."""
        for rows in self.groups:
            if rows.lengths is not None:
                rows.lengths = rows.lengths[index.to(rows.lengths.device)]
                rows.positions = rows.positions[index.to(rows.positions.device)]
                rows.stale = True
                _mark_static(rows.lengths, rows.positions)
        for layer in self.layers:
            layer.select_rows(index)
        self.token_counts = {
            kind: tuple(count[index.to(count.device)] for count in counts)
            for kind, counts in self.token_counts.items()
        }

    def reset(self) -> None:
        super().reset()
        self.seen, self._has_past = None, False

    def allocated_kv_bytes(self) -> int:
        """Bytes of the key/value buffers allocated (the worst case this cache was sized for)."""
        return sum(
            layer.key_buffer.nbytes + layer.value_buffer.nbytes for layer in self.layers if layer.is_initialized
        )


__all__ = ["DynamicLlavaStaticCache", "DynamicLlavaStaticLayer"]
