"""`dynamic-llava bench`, the measurements: Dynamic-LLaVA against transformers' `LlavaForConditionalGeneration`
(same weights, one run).

A model of a named shape (`PRESETS`) is built with random weights; the baseline Llava shares the very same tensors (no
copy). Both are measured alternately, so load changes on a shared machine hit both alike:

- prefill (time to first token: one forward with a fresh cache, `logits_to_keep=1`, vision tower included), median of
  `repeats` runs after `warmup` runs per batch size;
- decoding with a KV cache: greedy `generate()` with exactly `new_tokens` tokens (`min_new_tokens = max_new_tokens`,
  no EOS), timed per step by a logits processor; ms/token is the median step, tokens/s the whole run. The baseline is
  measured as a user would run it: with its default DynamicCache, with `cache_implementation="static"`, and with the
  static cache plus generate's compiled decoding step (`compile_config`), all alternating with ours;
- KV-cache bytes (ours: `sparsity_report()` stored vs dense, plus the allocated buffers; baselines: their caches) and
  the peak memory of each call above what was in use before it: `torch.cuda.max_memory_allocated` on CUDA, the
  resident-size high-water mark on CPU (Linux; freed heap is handed back first, so it is not counted as free room);
- analytic FLOPs (`flops.py`, paper convention and exact matmul counts) beside every measured ratio, and for decoding
  also the bytes read per step (weights + KV), the limit of a memory-bound step;
- a prefill keep-rate sweep (0.1 … 1.0) with a PNG plot.

Random predictors keep or drop almost every generated token. So before each timed decoding point an untimed run with
the same inputs and length shifts the output-text predictor's keep/drop bias to the quantile that keeps
`output_keep_rate` of its generated tokens; the realised rate of the timed run is reported (overall and per row: a
random model repeats a few tokens per row, so its decisions differ far more between rows than within one, and the
cache pads every row to the longest). `output_keep_pattern="alternate"` instead replaces the predictor's decision by a
fixed rule that keeps every other generated token of every row: the memory a cache holding half of each reply needs.
"""

import os
import platform
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial

import torch
from accelerate import init_empty_weights
from transformers import (
    CompileConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
)

from ..compat_dynamic_llava import CACHE_NAME
from .analytic import analytic_no_cache_decode, analytic_prefill, baseline_config, ratio
from .flops import ModelShape, cached_decode_flops, cached_decode_kv_read_bytes, total_flops
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..train.calibration import calibrate_output_text_predictor as calibrate_on_run
from ..utils import progress_bar
from .presets import PRESETS, BenchPreset, BenchSettings, resolve_device_and_dtype
from .timing import StepCallback, StepClock, Stopwatch, alternate


# Tokens the baseline generates untimed before each decoding point (its warm-up; ours warms up by calibrating).
WARMUP_TOKENS = 4


# ---------------------------------------------------------------------------------------------------------------------
# Models and inputs


def build_models(
    preset: BenchPreset,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    vision_keep_rate: float | None = None,
    seed: int = 0,
) -> tuple[DynamicLlavaForConditionalGeneration, LlavaForConditionalGeneration]:
    """Dynamic-LLaVA with random weights, and transformers' Llava sharing the same tensors (predictors aside)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DynamicLlavaForConditionalGeneration._from_config(
            preset.config(vision_keep_rate), dtype=dtype, attn_implementation=attn_implementation
        )
    return model.eval(), baseline_llava(model)


def baseline_llava(model: DynamicLlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """`LlavaForConditionalGeneration` whose parameters are the given model's own tensors (no copy)."""
    config = model.config
    llava_config = LlavaConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        image_token_index=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    # Parameters on the meta device (nothing allocated), buffers (RoPE tables) real; then adopt the model's tensors.
    with init_empty_weights(include_buffers=False):
        baseline = LlavaForConditionalGeneration._from_config(
            llava_config, dtype=model.dtype, attn_implementation=config.text_config._attn_implementation
        )
    shared = {name: tensor for name, tensor in model.state_dict().items() if "_score_predictor." not in name}
    baseline.load_state_dict(shared, strict=True, assign=True)
    return baseline.to(model.device).eval()


def make_inputs(preset: BenchPreset, config, batch_size: int, device: torch.device, dtype: torch.dtype, seed: int):
    """`batch_size` rows of the same length: BOS, text, one image's placeholder tokens, text; random pixels."""
    generator = torch.Generator().manual_seed(seed)
    image_token = config.image_token_id

    def text(length: int) -> torch.Tensor:
        return torch.randint(
            3, min(image_token, config.text_config.vocab_size), (batch_size, length), generator=generator
        )

    input_ids = torch.cat(
        [
            torch.ones(batch_size, 1, dtype=torch.long),
            text(preset.text_tokens_before_image - 1),
            torch.full((batch_size, config.image_seq_length), image_token),
            text(preset.text_tokens_after_image),
        ],
        dim=1,
    )
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Output-text predictor calibration


def calibrate_output_text_predictor(
    model, inputs: dict, target_keep_rate: float, new_tokens: int, on_step: Callable[[], object] | None = None
) -> dict:
    """Shifts the output-text predictor's keep/drop bias so that `target_keep_rate` of the generated tokens of a run on
    `inputs` would have been kept (a random predictor keeps or drops nearly all of them). Returns what it did.
    `on_step` is called at each generation step of that run."""
    return calibrate_on_run(model, partial(generate, model, inputs, new_tokens, on_step=on_step), target_keep_rate)


def keep_every_other_token(step) -> torch.Tensor:
    """`output_text_keep` of the "alternate" pattern: keeps the tokens at even input positions, in every row (so a
    decoding step keeps every other generated token; no host read, so it compiles)."""
    positions = step.past_seen + torch.arange(step.num_new, device=step.valid.device)
    return (positions % 2 == 0).expand_as(step.valid)


@contextmanager
def output_keep_pattern(model, pattern: str):
    """Within the block, `model` decides which generated tokens to keep by `pattern` ("calibrated": its own
    predictor; "alternate": `keep_every_other_token`)."""
    if pattern == "calibrated":
        yield
        return
    model.model.output_text_keep = keep_every_other_token  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.model.output_text_keep


def generate(
    model,
    inputs: dict,
    new_tokens: int,
    clock: StepClock | None = None,
    on_step: Callable[[], object] | None = None,
    **generate_kwargs,
):
    """Greedy generation of exactly `new_tokens` tokens (no EOS), returning the generate output. `clock` times the
    steps; `on_step` is called at each of them; `generate_kwargs` go to `generate()` (the cache, compilation)."""
    processors = [clock] if clock is not None else []
    if on_step is not None:
        processors.append(StepCallback(on_step))
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        logits_processor=LogitsProcessorList(processors),
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    produced = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"{type(model).__name__} generated {produced} tokens instead of {new_tokens}")
    return out


def compile_dynamic(settings: BenchSettings, preset: BenchPreset) -> bool:
    return preset.compile_dynamic if settings.compile_dynamic is None else settings.compile_dynamic


def baseline_generate_kwargs(kind: str, settings: BenchSettings, preset: BenchPreset, device: torch.device) -> dict:
    """What a transformers user passes to `generate()` for each baseline: nothing (DynamicCache), a StaticCache with
    eager decoding steps, or a StaticCache with the decoding step compiled."""
    if kind == "default":
        return {}
    if kind == "static":
        # On CUDA generate() compiles the decoding step by itself whenever the cache is compileable (transformers'
        # StaticCache and ours), with its default CompileConfig; "static" is the eager static cache.
        return {"cache_implementation": "static", "disable_compile": True}
    config = CompileConfig(
        dynamic=compile_dynamic(settings, preset),
        backend=settings.compile_backend,
        mode="reduce-overhead" if device.type == "cuda" else "default",  # CUDA graphs exist only on CUDA
    )
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told so
    return {"cache_implementation": "static", "compile_config": config}


def cache_tensor_bytes(cache) -> int:
    """Bytes of the K/V tensors a cache has allocated. Ours: its buffers, scratch and room to grow included (its
    `keys`/`values` show only the stored entries); transformers' caches: their `keys`/`values`."""
    total = 0
    for layer in cache.layers:
        names = ("key_buffer", "value_buffer") if hasattr(layer, "key_buffer") else ("keys", "values")
        for tensor in (getattr(layer, name, None) for name in names):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def parameter_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark


def environment(device: torch.device, dtype: torch.dtype, attn_implementation: str) -> dict:
    import transformers

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn_implementation,
        "gpu_figures_measured": device.type == "cuda",
    }


def cpu_name() -> str:
    try:  # Linux names the model in /proc/cpuinfo; platform.processor() is often empty there
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not available on every platform
        return None


def run_benchmark(settings: BenchSettings) -> dict:
    """Runs everything `settings` asks for and returns the results (see the module docstring); nothing is written."""
    settings.validate()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    preset = PRESETS[settings.preset]
    device, dtype = resolve_device_and_dtype(settings)
    new_tokens = settings.new_tokens or (preset.cuda_new_tokens if device.type == "cuda" else preset.new_tokens)
    model, baseline = build_models(
        preset, device, dtype, settings.attn_implementation, settings.vision_keep_rate, settings.seed
    )
    if settings.compile_prefill:
        model.compile_prefill(**settings.prefill_compile_kwargs())
    return measure_everything(settings, preset, device, dtype, new_tokens, model, baseline)


def measure_everything(settings, preset, device, dtype, new_tokens, model, baseline) -> dict:
    """`run_benchmark`'s measurements on the built models."""
    config = model.config
    shape = ModelShape.from_config(config)
    base_shape = ModelShape.from_config(baseline_config(config))
    keep_rate = config.vision_keep_rate
    stopwatch = Stopwatch(device)
    decode_grid = [(batch, tokens) for batch in settings.decode_batch_sizes for tokens in new_tokens]

    def phase_bar(description: str, total: int, unit: str):
        """One bar per phase, counting units of one size (a bar mixing prefill runs and 1K-token generations would
        jump between estimates of seconds and of an hour); none for an empty phase."""
        return progress_bar(total=total, desc=description, unit=unit, enabled=settings.progress and total > 0)

    results = {
        "preset": preset.name,
        "description": preset.description,
        "environment": environment(device, dtype, settings.attn_implementation),
        "settings": {**asdict(settings), "new_tokens": list(new_tokens)},
        "vision_keep_rate": keep_rate,
        "load_average": {"start": load_average()},
        "weights_bytes": parameter_bytes(model),
        "prefill_flops": analytic_prefill(shape, base_shape, preset, keep_rate, 1),
    }
    models = (model, baseline, preset, shape, base_shape)
    runs_per_point = 2 * (settings.warmup + settings.repeats)  # both models
    # Steps per decoding point: ours' calibration run, the warm-ups (a compiled one at full length: its graph depends
    # on the static cache's length), then the timed runs of every side.
    kinds = [*settings.baselines, *settings.our_modes]
    sides = 2 + len(kinds)
    warmups = WARMUP_TOKENS * (1 + kinds.count("static"))
    calibrated = settings.output_keep_pattern == "calibrated"
    decode_steps = sum(
        (tokens if calibrated else WARMUP_TOKENS)
        + tokens * kinds.count("compiled")
        + warmups
        + sides * settings.decode_repeats * tokens
        for _, tokens in decode_grid
    )
    with torch.inference_mode():
        with phase_bar("Prefill", runs_per_point * sum(settings.prefill_batch_sizes), "row") as bar:
            results["prefill"] = [
                measure_prefill(*models, batch, settings, stopwatch, tick=partial(bar.update, batch))
                for batch in settings.prefill_batch_sizes
            ]
        results["load_average"]["after_prefill"] = load_average()

        with (
            phase_bar("Decoding", decode_steps, "step") as bar,
            output_keep_pattern(model, settings.output_keep_pattern),
        ):
            results["decode"] = [
                measure_decode(*models, batch, tokens, settings, stopwatch, tick=bar.update)
                for batch, tokens in decode_grid
            ]
        results["load_average"]["after_decode"] = load_average()

        realised = [row["ours"]["output_keep_rate"] for row in results["decode"]]
        output_keep_rate = statistics.fmean(realised) if realised else settings.output_keep_rate
        results["no_cache_decode_flops"] = [
            analytic_no_cache_decode(shape, base_shape, preset, keep_rate, output_keep_rate, tokens)
            for tokens in new_tokens
        ]
        with phase_bar("Keep-rate sweep", runs_per_point * len(settings.sweep_keep_rates), "run") as bar:
            results["keep_rate_sweep"] = [
                measure_prefill(
                    *models,
                    settings.sweep_batch_size,
                    settings,
                    stopwatch,
                    tick=bar.update,
                    sparsity={"vision_keep_rate": rate},
                )
                for rate in settings.sweep_keep_rates
            ]
        results["load_average"]["end"] = load_average()
    return results


def measure_prefill(
    model, baseline, preset, shape, base_shape, batch, settings, stopwatch, tick, sparsity=None
) -> dict:
    """Times the prefill of both models at one batch size; `tick()` is called after each forward."""
    device, dtype = model.device, model.dtype
    inputs = make_inputs(preset, model.config, batch, device, dtype, settings.seed)
    extra = {} if sparsity is None else {"sparsity": sparsity}
    samples, last = alternate(
        lambda: model(**inputs, use_cache=True, logits_to_keep=1, **extra),
        lambda: baseline(**inputs, use_cache=True, logits_to_keep=1),
        settings.repeats,
        settings.warmup,
        stopwatch,
        tick,
    )
    keep_rate = model.config.vision_keep_rate if sparsity is None else sparsity["vision_keep_rate"]
    analytic = analytic_prefill(shape, base_shape, preset, keep_rate, batch)
    # What the model really kept in layers >= sparse_layer must match what the FLOPs assume.
    stored = last["ours"][0][CACHE_NAME].stored_lengths()
    kept_image = int(stored[-1, 0]) - preset.num_text_tokens
    if kept_image != analytic["kept_image_tokens"]:
        raise RuntimeError(
            f"the model kept {kept_image} image tokens, the FLOPs assume {analytic['kept_image_tokens']}"
        )
    ours_ms = 1000 * statistics.median(samples["ours"])
    baseline_ms = 1000 * statistics.median(samples["baseline"])
    return {
        "batch_size": batch,
        "vision_keep_rate": keep_rate,
        "ours_ms": ours_ms,
        "baseline_ms": baseline_ms,
        "ratio": ratio(ours_ms, baseline_ms),
        "ours_ms_samples": [1000 * s for s in samples["ours"]],
        "baseline_ms_samples": [1000 * s for s in samples["baseline"]],
        "peak_memory_bytes": {"ours": last["ours"][1], "baseline": last["baseline"][1]},
        "flops": analytic,
    }


def warm_up(model, baseline, inputs, tokens, settings, preset, tick) -> dict:
    """The generate() calls of a decoding point, by side: (model, generate kwargs). Each is run untimed first: a
    compiled one at full length (compiling for this batch and cache length), the others for a few tokens."""
    device = model.device
    # generate() sizes a static cache for the longest generation the model ever ran (to spare recompilations); each
    # point measures one sized for its own length.
    vars(baseline).pop("_previous_max_cache_length", None)
    compiled = "compiled" in settings.baselines or "compiled" in settings.our_modes
    if compiled and not compile_dynamic(settings, preset):
        torch._dynamo.reset()  # fresh static-shape graphs per point, not a pile of recompilations
    candidates = {"ours": (model, {})}
    sides = [(kind, baseline, kind) for kind in ("default", *settings.baselines)]
    sides += [(f"ours_{kind}", model, kind) for kind in settings.our_modes]
    for side, candidate, kind in sides:
        kwargs = baseline_generate_kwargs(kind, settings, preset, device)
        candidates[side] = (candidate, kwargs)
        generate(candidate, inputs, tokens if kind == "compiled" else WARMUP_TOKENS, on_step=tick, **kwargs)
    return candidates


def compare_our_modes(our_modes: dict, runs: dict, llava_sides: dict) -> None:
    """Completes the summaries of our fixed-capacity modes: allocated KV bytes, whether they generated the dynamic
    cache's tokens (they should: the same computation), and ratios against every Llava side."""
    for kind, side in our_modes.items():
        side["allocated_kv_bytes"] = side.pop("kv_bytes")
        side["same_tokens_as_dynamic_cache"] = torch.equal(
            runs[f"ours_{kind}"][-1]["sequences"], runs["ours"][-1]["sequences"]
        )
        side.update(ratios_against(side, llava_sides))


def ratios_against(side: dict, llava_sides: dict) -> dict:
    """`side`'s ms/token and peak memory as ratios of every Llava side's (None where either is unknown)."""
    return {
        key: {other: ratio(side[name], theirs[name]) for other, theirs in llava_sides.items()}
        for name, key in (("ms_per_token", "ms_per_token_ratio_vs"), ("peak_memory_bytes", "peak_memory_ratio_vs"))
    }


def measure_decode(model, baseline, preset, shape, base_shape, batch, tokens, settings, stopwatch, tick) -> dict:
    """Times the decoding of our model and of each baseline at one batch size and length, alternating; `tick()` is
    called at each generation step."""
    device, dtype = model.device, model.dtype
    inputs = make_inputs(preset, model.config, batch, device, dtype, settings.seed)
    # Untimed: calibrate the output-text predictor on these very inputs (also ours' warm-up); warm the baselines up.
    if settings.output_keep_pattern == "calibrated":
        calibration = calibrate_output_text_predictor(model, inputs, settings.output_keep_rate, tokens, on_step=tick)
    else:
        calibration = {"pattern": settings.output_keep_pattern}
        generate(model, inputs, WARMUP_TOKENS, on_step=tick)
    candidates = warm_up(model, baseline, inputs, tokens, settings, preset, tick)

    runs = {side: [] for side in candidates}
    order = list(candidates)
    for repeat in range(settings.decode_repeats):
        for side in order if repeat % 2 == 0 else reversed(order):
            clock = StepClock(device)
            candidate, kwargs = candidates[side]
            _, out, peak = stopwatch(
                lambda m=candidate, c=clock, k=kwargs: generate(m, inputs, tokens, c, on_step=tick, **k)
            )
            cache = out[CACHE_NAME]
            run = {"steps": clock.step_seconds(), "peak": peak, "kv_bytes": cache_tensor_bytes(cache)}
            runs[side].append({**run, "sequences": out.sequences.cpu()})
            if side == "ours":
                our_cache = cache  # for its sparsity report; the baselines' caches are let go at once
            del out, cache

    def summary(side: str) -> dict:
        medians = [statistics.median(run["steps"]) for run in runs[side]]
        whole = [sum(run["steps"]) for run in runs[side]]
        ms_per_token = 1000 * statistics.median(medians)
        return {
            "ms_per_token": ms_per_token,
            "tokens_per_s": 1000 * batch / ms_per_token,
            "ms_per_token_whole_run": 1000 * statistics.median(whole) / (tokens - 1),
            "tokens_per_s_whole_run": batch * (tokens - 1) / statistics.median(whole),
            "peak_memory_bytes": runs[side][-1]["peak"],
            "kv_bytes": runs[side][-1]["kv_bytes"],
        }

    ours, base = summary("ours"), summary("default")
    others = {kind: summary(kind) for kind in settings.baselines}
    our_modes = {kind: summary(f"ours_{kind}") for kind in settings.our_modes}
    compare_our_modes(our_modes, runs, {"default": base, **others})
    report = our_cache.sparsity_report()
    stored = sum(row["stored_kv_bytes"] for row in report)
    dense = sum(row["dense_kv_bytes"] for row in report)
    kept = sum(row["generated_tokens_kept"] for row in report)
    judged = sum(row["generated_tokens_total"] for row in report)
    row_rates = [row["generated_tokens_kept"] / row["generated_tokens_total"] for row in report]
    ours.update(
        stored_kv_bytes=stored,
        dense_kv_bytes=dense,
        allocated_kv_bytes=ours.pop("kv_bytes"),
        output_keep_rate=kept / judged if judged else None,
        output_keep_rate_row_range=[min(row_rates), max(row_rates)],
        image_tokens_kept=report[0]["image_tokens_kept"],
    )

    # Analytic cost of the decoding steps, at the realised output keep rate.
    prompt = inputs["input_ids"].shape[1]
    kept_prompt = preset.num_text_tokens + ours["image_tokens_kept"]
    rate = ours["output_keep_rate"]
    flops_ours = total_flops(cached_decode_flops(shape, prompt, tokens, kept_prompt, rate, batch))
    flops_base = total_flops(cached_decode_flops(base_shape, prompt, tokens, batch_size=batch))
    value_bytes = torch.finfo(dtype).bits // 8
    steps = tokens - 1
    # Each decoding step reads the decoder layers' and the LM head's weights once (of the embeddings only one row per
    # token), plus every stored K/V entry.
    language_model = model.model.language_model
    step_weights = (
        parameter_bytes(language_model) - parameter_bytes(language_model.embed_tokens) + parameter_bytes(model.lm_head)
    )
    read_ours = steps * (step_weights + parameter_bytes(model.model.output_text_score_predictor))
    read_ours += cached_decode_kv_read_bytes(shape, prompt, tokens, value_bytes, kept_prompt, rate, batch)
    read_base = steps * step_weights + cached_decode_kv_read_bytes(
        base_shape, prompt, tokens, value_bytes, None, None, batch
    )
    return {
        "batch_size": batch,
        "new_tokens": tokens,
        "calibration": calibration,
        "ours": ours,
        "baseline": base,
        "ms_per_token_ratio": ratio(ours["ms_per_token"], base["ms_per_token"]),
        # transformers' Llava with its StaticCache and with that cache plus the compiled step, same weights.
        "baselines": others,
        # Ours with the fixed-capacity cache (cache_implementation="static"), eager and compiled.
        "our_modes": our_modes,
        **ratios_against(ours, {"default": base, **others}),
        "kv_bytes_ratio": ratio(stored, dense),
        "flops_per_token": {
            "ours": flops_ours / steps,
            "baseline": flops_base / steps,
            "ratio": ratio(flops_ours, flops_base),
        },
        "bytes_read_per_token": {
            "ours": read_ours / steps,
            "baseline": read_base / steps,
            "ratio": ratio(read_ours, read_base),
        },
    }
