"""`dynamic-llava bench`, the report: a markdown summary, the keep-rate sweep plot and the JSON results."""

import json
import os


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _flops(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_report(results: dict) -> str:
    """The results as Markdown tables (what the CLI prints)."""
    lines = [f"## `{results['preset']}`: Dynamic-LLaVA vs transformers' Llava (same weights)", ""]
    lines += [results["description"] + ".", ""]
    env = results.get("environment")
    cuda = bool(env and env["gpu_figures_measured"])
    keep = results["vision_keep_rate"]
    if env:
        lines.append(
            f"Device: {env['device']}, {env['cpu_count']} CPU cores ({env['torch_threads']} torch threads), "
            f"torch {env['torch']}, transformers {env['transformers']}, {env['dtype']}, "
            f"attention {env['attn_implementation']}. Load average (1/5/15 min) at start: "
            f"{results['load_average']['start']}, at end: {results['load_average']['end']}."
        )
        if not cuda:
            lines.append(
                "No GPU figures. Peak memory on CPU: the process's resident-size high-water mark during the call "
                "above its resident size before it."
            )
        lines.append("")

    if results.get("prefill"):
        header = [
            "batch",
            "baseline ms",
            "Dynamic-LLaVA ms",
            "measured ratio",
            "exact-FLOPs ratio",
            "paper-FLOPs ratio",
        ]
        rows = []
        for row in results["prefill"]:
            flops = row["flops"]
            cells = [
                str(row["batch_size"]),
                _fmt(row["baseline_ms"], 1),
                _fmt(row["ours_ms"], 1),
                f"**{_fmt(row['ratio'], 3)}**",
                _fmt(flops["exact"]["ratio"], 3),
                _fmt(flops["paper"]["ratio"], 3),
            ]
            cells.append(
                f"{_bytes(row['peak_memory_bytes']['baseline'])} / {_bytes(row['peak_memory_bytes']['ours'])}"
            )
            rows.append(cells)
        lines += [f"### Prefill (time to first token), vision keep rate {keep}", ""]
        lines += _table(header + ["peak memory baseline / ours"], rows)
        flops = results["prefill"][0]["flops"]
        settings = results["settings"]
        note = (
            f"Image tokens {flops['image_tokens']} -> {flops['kept_image_tokens']} from layer `sparse_layer` on. "
            f"Median of {settings['repeats']} runs after {settings['warmup']} warm-up run(s), the models alternating."
        )
        if settings.get("compile_prefill"):
            mode = settings.get("compile_prefill_mode")
            note += (
                " Ours with its decoder-layer loops compiled (`compile_prefill`, with the vision tower and the image "
                f"predictor; backend {settings['compile_backend']}{f', mode {mode}' if mode else ''}; compiled during "
                "the warm-up); the baseline's prefill is eager, as generate() runs it."
            )
        lines += ["", note, ""]

    if results.get("decode"):
        header = [
            "batch",
            "new tokens",
            "baseline ms/token",
            "Dynamic-LLaVA ms/token",
            "measured ratio",
            "baseline tok/s",
            "Dynamic-LLaVA tok/s",
            "output keep rate (rows)",
            "KV stored / dense",
            "KV allocated: ours / baseline",
            "exact-FLOPs ratio",
            "bytes-read ratio",
        ]
        rows = []
        for row in results["decode"]:
            ours, base = row["ours"], row["baseline"]
            cells = [
                str(row["batch_size"]),
                str(row["new_tokens"]),
                _fmt(base["ms_per_token"]),
                _fmt(ours["ms_per_token"]),
                f"**{_fmt(row['ms_per_token_ratio'], 3)}**",
                _fmt(base["tokens_per_s"], 1),
                _fmt(ours["tokens_per_s"], 1),
                f"{_fmt(ours['output_keep_rate'], 2)} ({_fmt(ours['output_keep_rate_row_range'][0], 2)}-"
                + f"{_fmt(ours['output_keep_rate_row_range'][1], 2)})",
                f"**{_fmt(row['kv_bytes_ratio'], 3)}** ({_bytes(ours['stored_kv_bytes'])} / "
                + f"{_bytes(ours['dense_kv_bytes'])})",
                f"{_bytes(ours['allocated_kv_bytes'])} / {_bytes(base['kv_bytes'])}",
                _fmt(row["flops_per_token"]["ratio"], 3),
                _fmt(row["bytes_read_per_token"]["ratio"], 3),
            ]
            cells.append(f"{_bytes(base['peak_memory_bytes'])} / {_bytes(ours['peak_memory_bytes'])}")
            rows.append(cells)
        if results["settings"].get("output_keep_pattern") == "alternate":
            decided = (
                "not the predictor but a fixed rule kept every other generated token of every row (0.5 per row by "
                "construction: `--output-keep-pattern alternate`)"
            )
        else:
            decided = (
                f"its bias was calibrated to {results['settings']['output_keep_rate']} by an untimed run on the same "
                "inputs"
            )
        lines += ["### Decoding with a KV cache (greedy, exactly N new tokens)", ""]
        lines += _table(header + ["peak memory baseline / ours"], rows)
        note = (
            "ms/token: median decoding step (the JSON also has whole-run means); tok/s: batch / median step. Output "
            "keep rate: share of generated tokens the output-text predictor kept, overall (lowest-highest row); "
            f"{decided}. KV stored / dense: "
            "`sparsity_report()` after the run (the baseline's DynamicCache holds the dense amount). KV allocated: "
            "the cache tensors' size (ours: preallocated buffers, rows padded to the longest one, growth headroom "
            "included). Exact-FLOPs and bytes-read ratios: analytic, per decoding step (bytes read = weights + stored "
            "K/V), at the realised keep rate."
        )
        lines += ["", note, ""]
        lines += _baselines_table(results["decode"])

    analytic = [("prefill", results["prefill_flops"])]
    for row in results.get("no_cache_decode_flops", []):
        name = f"decoding without cache, {row['new_tokens']} tokens (output keep {row['output_keep_rate']:.2f})"
        analytic.append((name, row))
    rows = [
        [
            name,
            f"{_flops(row['paper']['baseline'])} -> {_flops(row['paper']['ours'])}",
            _fmt(row["paper"]["ratio"], 3),
            f"{_flops(row['exact']['baseline'])} -> {_flops(row['exact']['ours'])}",
            _fmt(row["exact"]["ratio"], 3),
        ]
        for name, row in analytic
    ]
    lines += [f"### Analytic FLOPs per sample (vision keep rate {keep})", ""]
    lines += _table(
        ["phase", "paper convention: baseline -> ours", "ratio", "exact matmuls: baseline -> ours", "ratio"], rows
    )
    note = (
        "Paper convention: 32·N·C² + 4·N²·C per layer over the N image tokens (plus the generated ones when "
        "decoding), C the hidden size. Exact: every matrix product of the implementation (vision tower, projector, "
        "predictors, decoder at its real MLP width, attention, LM head)."
    )
    lines += ["", note, ""]

    if results.get("keep_rate_sweep"):
        sweep = results["keep_rate_sweep"]
        header = ["vision keep rate", "kept image tokens", "baseline ms", "Dynamic-LLaVA ms", "measured ratio"]
        header += ["exact-FLOPs ratio", "paper-FLOPs ratio"]
        rows = [
            [
                f"{row['vision_keep_rate']:.1f}",
                str(row["flops"]["kept_image_tokens"]),
                _fmt(row["baseline_ms"], 1),
                _fmt(row["ours_ms"], 1),
                _fmt(row["ratio"], 3),
                _fmt(row["flops"]["exact"]["ratio"], 3),
                _fmt(row["flops"]["paper"]["ratio"], 3),
            ]
            for row in sweep
        ]
        lines += [f"### Prefill keep-rate sweep (batch {sweep[0]['batch_size']})", ""] + _table(header, rows) + [""]
    return "\n".join(lines)


BASELINE_NAMES = {
    "default": "Llava, DynamicCache",
    "static": "Llava, static cache",
    "compiled": "Llava, static cache + compile",
}


OUR_NAMES = {
    "dynamic": "Dynamic-LLaVA (dynamic cache)",
    "static": "Dynamic-LLaVA, static cache",
    "compiled": "Dynamic-LLaVA, static cache + compile",
}


def _baselines_table(decode: list[dict]) -> list[str]:
    """Ours against every cache choice of transformers' Llava: one row per decoding point and implementation."""
    if not any(row.get("baselines") for row in decode):
        return []
    rows = []
    for row in decode:
        sides = {"default": row["baseline"], **row["baselines"]}
        point = [str(row["batch_size"]), str(row["new_tokens"])]
        for kind, side in sides.items():
            cells = [BASELINE_NAMES[kind], _fmt(side["ms_per_token"]), _fmt(side["tokens_per_s"], 1)]
            cells += [_bytes(side["peak_memory_bytes"]), _bytes(side["kv_bytes"])]
            ratios = [row["ms_per_token_ratio_vs"][kind], row["peak_memory_ratio_vs"][kind]]
            rows.append(point + cells + [f"**{_fmt(ratios[0], 3)}**", _fmt(ratios[1], 3)])
        ours = {"dynamic": row["ours"], **row.get("our_modes", {})}
        for kind, side in ours.items():
            cells = [OUR_NAMES[kind], _fmt(side["ms_per_token"]), _fmt(side["tokens_per_s"], 1)]
            rows.append(
                point + cells + [_bytes(side["peak_memory_bytes"]), _bytes(side["allocated_kv_bytes"]), "", ""]
            )
    header = ["batch", "new tokens", "implementation", "ms/token", "tok/s", "peak memory", "KV allocated"]
    header += ["ours / this ms/token", "ours / this peak memory"]
    note = (
        "Same weights, same inputs, one process, the implementations alternating. Peak memory: of the whole "
        "generate() call, above what was in use before it (CUDA: allocated; CPU: resident size). The compiled "
        "runs were compiled (untimed) at the same batch and length before their timed run. The ratio columns compare "
        'Dynamic-LLaVA with its default (dynamic) cache; its fixed-capacity modes (cache_implementation="static", '
        "eager and compiled) allocate KV room for every token of the generation in every layer."
    )
    lines = ["### Decoding against transformers' cache choices", ""] + _table(header, rows) + ["", note, ""]
    return lines + _compiled_comparison(decode)


def _compiled_comparison(decode: list[dict]) -> list[str]:
    """One line per point: our compiled mode against Llava's compiled static cache, where both were measured."""
    lines = []
    for row in decode:
        ours = row.get("our_modes", {}).get("compiled")
        if ours is None or "compiled" not in row.get("baselines", {}):
            continue
        same = "same" if ours["same_tokens_as_dynamic_cache"] else "**different**"
        lines.append(
            f"- batch {row['batch_size']}, {row['new_tokens']} tokens: Dynamic-LLaVA static cache + compile ÷ Llava "
            f"static cache + compile: ms/token **{_fmt(ours['ms_per_token_ratio_vs']['compiled'], 3)}**, peak memory "
            f"{_fmt(ours['peak_memory_ratio_vs']['compiled'], 3)} ({same} tokens as our dynamic cache)"
        )
    return lines + [""] if lines else []


def plot_keep_rate_sweep(results: dict, path: str) -> None:
    """PNG of the prefill time ratio (ours / baseline) against the vision keep rate, with the analytic ratios."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The plot needs matplotlib: pip install 'dynamic-llava-hf[bench]'") from error
    sweep = results["keep_rate_sweep"]
    rates = [row["vision_keep_rate"] for row in sweep]
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    axes.plot(rates, [row["ratio"] for row in sweep], "o-", label="measured time ratio")
    axes.plot(rates, [row["flops"]["exact"]["ratio"] for row in sweep], "s--", label="exact matmul FLOPs ratio")
    axes.plot(rates, [row["flops"]["paper"]["ratio"] for row in sweep], "^:", label="paper-convention FLOPs ratio")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("vision keep rate (image tokens kept from layer sparse_layer on)")
    axes.set_ylabel("Dynamic-LLaVA / Llava")
    device = results.get("environment", {}).get("device", "")
    axes.set_title(f"Prefill, {results['preset']}, batch {sweep[0]['batch_size']}\n{device}", fontsize=10)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(results: dict, json_path: str, plot_path: str | None, force: bool = False) -> list[str]:
    """Writes the JSON (and the PNG when there is a sweep); refuses to overwrite existing files unless `force`."""
    targets = [json_path] + ([plot_path] if plot_path and results.get("keep_rate_sweep") else [])
    existing = [path for path in targets if os.path.exists(path)]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    for path in targets:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if len(targets) > 1:
        plot_keep_rate_sweep(results, plot_path)
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=2)
    return targets
