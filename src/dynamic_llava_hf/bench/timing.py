"""`dynamic-llava bench`, the timing: wall time of a call, of each generation step, and both models alternately."""

import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessor


class Stopwatch:
    """Wall time of a call: CUDA events on a GPU (the CUDA path is not exercised in this project's CPU-only CI),
    `time.perf_counter` on CPU. On CUDA it also records the peak memory allocated during the call above what was
    allocated before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> tuple[float, object, int | None]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            allocated_before = torch.cuda.memory_allocated(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            peak = torch.cuda.max_memory_allocated(self.device) - allocated_before
            return start.elapsed_time(end) / 1000.0, result, peak
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result, None


class StepCallback(LogitsProcessor):
    """Calls `callback()` at each generation step (`generate()` runs logits processors once per step)."""

    def __init__(self, callback: Callable[[], object]):
        self.callback = callback

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.callback()
        return scores


class StepClock(LogitsProcessor):
    """Timestamps each generation step: `generate()` calls logits processors once per step, right after the forward.

    On CUDA it records events (no synchronisation of its own), read after `generate()` returns.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(time.perf_counter())
        return scores

    def step_seconds(self) -> list[float]:
        """Durations of the decoding steps (step i's stamp minus step i-1's), the prefill step excluded."""
        if self.cuda:
            self.stamps[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.stamps, self.stamps[1:])]
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def alternate(run_ours: Callable, run_baseline: Callable, repeats: int, warmup: int, stopwatch: Stopwatch, tick):
    """Times both callables alternately (the order flips every repeat). Returns per side the samples in seconds, the
    last result and the last peak memory."""
    for _ in range(warmup):
        run_ours()
        tick()
        run_baseline()
        tick()
    samples = {"ours": [], "baseline": []}
    last = {}
    runs = {"ours": run_ours, "baseline": run_baseline}
    for repeat in range(repeats):
        for side in ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours"):
            seconds, result, peak = stopwatch(runs[side])
            samples[side].append(seconds)
            last[side] = (result, peak)
            tick()
    return samples, last
