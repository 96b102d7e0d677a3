"""`dynamic-llava bench`, the timing: wall time of a call, of each generation step, and both models alternately."""

import ctypes
import functools
import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessor


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    raise OSError(f"no {field} in /proc/self/status")


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    except OSError:
        return None


def _release_free_heap() -> None:
    """Hands the memory the C allocator keeps after frees back to the system, so that a call that reuses what an
    earlier call freed still shows up in the resident size."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_peak_rss() -> int | None:
    """Resets the kernel's resident-size high-water mark (Linux: VmHWM via /proc/self/clear_refs) and returns the
    resident size now; None where that is not possible."""
    try:
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


class Stopwatch:
    """Wall time of a call: CUDA events on a GPU (the CUDA path is not exercised in this project's CPU-only CI),
    `time.perf_counter` on CPU. It also records the call's peak memory above what was in use before it: allocated
    CUDA memory on a GPU, the process's resident size on CPU (Linux; None elsewhere)."""

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
        rss_before = reset_peak_rss()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        peak = None if rss_before is None else max(0, _status_bytes("VmHWM") - rss_before)
        return seconds, result, peak


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
