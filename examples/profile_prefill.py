"""Where a prefill's time goes: Dynamic-LLaVA against transformers' Llava (same random weights), timed alternately,
then one forward of each under the PyTorch profiler: kernel launches, GPU busy time and wall time per forward.

On a GPU at batch 1 a prefill whose wall time is well above its GPU busy time is bound by launching kernels, which
pruning image tokens does not reduce; `--compile-prefill` (and `--compile-mode reduce-overhead`, CUDA graphs) is
the remedy, and this script shows how much of the gap it closes. The `host-bound` preset (7B's depth at negligible
width) shows that host work on the CPU, where wall time is all it is.

    python examples/profile_prefill.py --preset llava-1.5-7b --dtype float16 --compile-prefill
    python examples/profile_prefill.py --preset llava-1.5-7b --dtype float16 --compile-prefill \
        --compile-mode reduce-overhead --output-dir profile-7b
    python examples/profile_prefill.py --preset host-bound --device cpu --dtype float32 --compile-prefill
"""

import argparse
import os
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from dynamic_llava_hf.bench.measure import build_models, make_inputs
from dynamic_llava_hf.bench.presets import PRESETS
from dynamic_llava_hf.bench.timing import Stopwatch, alternate
from dynamic_llava_hf.utils import torch_dtype


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--compile-prefill", action="store_true", help="model.compile_prefill() first")
    parser.add_argument("--compile-mode", help="torch.compile mode of --compile-prefill (e.g. reduce-overhead)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards per model (compiling, recording)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per model (median)")
    parser.add_argument("--output-dir", help="also write the profiler tables there")
    args = parser.parse_args()
    if args.compile_mode and not args.compile_prefill:
        parser.error("--compile-mode applies to --compile-prefill")
    return args


def profile_forward(forward, device: torch.device) -> tuple[dict, str]:
    """One forward under the profiler: kernel launches, GPU busy ms, dynamo's guard checks (one per compiled call,
    host time that CUDA graphs do not remove), and the op table sorted by CPU time."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    gpu = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    guard_checks = [event for event in events if event.key == "TorchDynamo Cache Lookup"]
    summary = {
        "kernel_launches": sum(event.count for event in gpu),
        "gpu_busy_ms": sum(event.self_device_time_total for event in gpu) / 1000,
        "compiled_calls": sum(event.count for event in guard_checks),
        "guard_check_ms": sum(event.cpu_time_total for event in guard_checks) / 1000,
    }
    return summary, events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), torch_dtype(args.dtype)
    preset = PRESETS[args.preset]
    model, baseline = build_models(preset, device, dtype)
    if args.compile_prefill:
        model.compile_prefill(**({"mode": args.compile_mode} if args.compile_mode else {}))
    inputs = make_inputs(preset, model.config, args.batch_size, device, dtype, seed=0)

    def run_ours():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def run_baseline():
        return baseline(**inputs, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        samples, _ = alternate(run_ours, run_baseline, args.repeats, args.warmup, Stopwatch(device), tick=lambda: None)
        for name, side, forward in (("Dynamic-LLaVA", "ours", run_ours), ("Llava", "baseline", run_baseline)):
            summary, table = profile_forward(forward, device)
            print(
                f"{name}: {1000 * statistics.median(samples[side]):.2f} ms per forward (median of {args.repeats}), "
                f"{summary['kernel_launches']} kernel launches, GPU busy {summary['gpu_busy_ms']:.2f} ms, "
                f"{summary['compiled_calls']} compiled calls (guard checks {summary['guard_check_ms']:.2f} ms)"
            )
            if args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                with open(os.path.join(args.output_dir, f"profile-{name}.txt"), "w") as file:
                    file.write(table)


if __name__ == "__main__":
    main()
