"""`dynamic-llava` command line."""

import argparse
import json
import os
import sys


# DynamicLlavaConfig fields that `convert` can set: (field, type); booleans get --FLAG / --no-FLAG.
SPARSE_OPTIONS = (
    ("sparse_layer", int),
    ("use_vision_predictor", bool),
    ("vision_keep_rate", float),
    ("vision_selector", str),  # "fastv" lets a freshly converted llava-hf checkpoint prune before any training
    ("use_output_text_predictor", bool),
    ("output_text_keep_rate", float),
    ("output_text_len_for_training", int),
    ("use_instruct_predictor", bool),
    ("instruct_keep_rate", float),
    ("instruct_len_for_training", int),
    ("predictor_d_model", int),
    ("predictor_num_heads", int),
    ("predictor_ffn_dim", int),
    ("predictor_num_layers", int),
    ("mask_loss_weight", float),
)


def add_convert_command(commands) -> None:
    convert = commands.add_parser("convert", help="convert a checkpoint into a self-contained Dynamic-LLaVA folder")
    sources = convert.add_subparsers(dest="source", required=True)
    original = sources.add_parser("original", help="official Dynamic-LLaVA checkpoint (LLaVA-1.5 layout)")
    llava_hf = sources.add_parser(
        "llava-hf", help="transformers LlavaForConditionalGeneration checkpoint; the predictors start untrained"
    )
    original.add_argument(
        "--vision-tower", help="CLIP folder or Hub id (default: the config's mm_vision_tower, relative to SRC first)"
    )
    llava_hf.add_argument(
        "--processor",
        choices=("llava-1.5", "source"),
        default="llava-1.5",
        help="llava-1.5: pad-to-square preprocessing + vicuna_v1 template (default); source: copy SRC's processor",
    )
    llava_hf.add_argument("--seed", type=int, default=0, help="seed of the predictors' initialisation")
    for parser in (original, llava_hf):
        parser.add_argument("src", help="source checkpoint folder")
        parser.add_argument("dst", help="output folder (must not exist unless --force)")
        parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="cast the weights")
        parser.add_argument("--force", action="store_true", help="replace DST (only once the conversion succeeded)")
        parser.add_argument(
            "--allow-pickle", action="store_true", help="also read pytorch_model*.bin (unpickling: trusted files only)"
        )
        parser.add_argument("--base-model", help="Hub id of the source, for the model card's base_model")
        parser.add_argument("--license", help="license for the model card (default: other)")
        parser.add_argument("--model-id", help="Hub id used in the model card's code (default: DST)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        sparse = parser.add_argument_group("sparsification settings (DynamicLlavaConfig fields)")
        for name, kind in SPARSE_OPTIONS:
            flag = "--" + name.replace("_", "-")
            if kind is bool:
                sparse.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
            else:
                sparse.add_argument(flag, dest=name, type=kind, default=None)


def run_convert(args) -> int:
    from .convert import CheckpointError, convert_llava_hf_checkpoint, convert_original_checkpoint

    overrides = {name: getattr(args, name) for name, _ in SPARSE_OPTIONS if getattr(args, name) is not None}
    common = {
        "dtype": args.dtype,
        "force": args.force,
        "allow_pickle": args.allow_pickle,
        "base_model": args.base_model,
        "license": args.license,
        "model_id": args.model_id,
        "progress": not args.no_progress,
    }
    try:
        if args.source == "original":
            result = convert_original_checkpoint(
                args.src, args.dst, vision_tower=args.vision_tower, **common, **overrides
            )
        else:
            result = convert_llava_hf_checkpoint(
                args.src, args.dst, processor=args.processor, seed=args.seed, **common, **overrides
            )
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"dynamic-llava convert: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {result.dst}: {result.num_tensors} tensors, verified.")
    if result.new_keys:
        print(f"{len(result.new_keys)} predictor tensors are freshly initialised: train them before using sparsity.")
    if not result.processor_written:
        print("No tokenizer in the source: no processor files written (see the model card).")
    return 0


def add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="prefill/decoding speed, KV memory and FLOPs against transformers' Llava (same random weights)",
        description="Builds a model of the preset's shape with random weights, shares them with transformers' "
        "LlavaForConditionalGeneration and measures both alternately. Writes a JSON file and a PNG plot of the "
        "prefill keep-rate sweep, and prints Markdown tables. Empty lists (e.g. `--decode-batch-sizes` with no "
        "value) skip that part.",
    )
    bench.add_argument("--preset", default="tiny", help="tiny, cpu-7b-topology, llava-1.5-7b, llava-1.5-13b")
    bench.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    bench.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 on cuda, fp32 on cpu"
    )
    bench.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa")
    bench.add_argument("--prefill-batch-sizes", type=int, nargs="*", default=[1, 8])
    bench.add_argument("--decode-batch-sizes", type=int, nargs="*", default=[1, 8, 32])
    bench.add_argument("--new-tokens", type=int, nargs="*", help="default: 256 1024, plus 4096 on cuda")
    bench.add_argument("--repeats", type=int, default=5, help="timed prefill runs per point (median)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed prefill runs per point")
    bench.add_argument("--decode-repeats", type=int, default=1, help="timed generations per decoding point")
    bench.add_argument("--vision-keep-rate", type=float, help="default: the config's 0.2")
    bench.add_argument(
        "--output-keep-rate", type=float, default=0.5, help="calibration target of the output keep rate"
    )
    bench.add_argument("--sweep-keep-rates", type=float, nargs="*", default=[round(0.1 * i, 1) for i in range(1, 11)])
    bench.add_argument("--sweep-batch-size", type=int, default=1)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    bench.add_argument("--output", help="JSON file (default: bench-PRESET.json)")
    bench.add_argument("--plot", help="PNG file of the keep-rate sweep (default: bench-PRESET.png)")
    bench.add_argument("--force", action="store_true", help="overwrite existing output files")
    bench.add_argument(
        "--analytic-only",
        action="store_true",
        help="only the analytic FLOPs (no weights built; any preset, any machine)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench(args) -> int:
    from .bench import BenchSettings, analytic_results, markdown_report, run_benchmark, write_outputs

    settings = BenchSettings(
        preset=args.preset,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        prefill_batch_sizes=tuple(args.prefill_batch_sizes),
        decode_batch_sizes=tuple(args.decode_batch_sizes),
        new_tokens=tuple(args.new_tokens) if args.new_tokens else None,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_repeats=args.decode_repeats,
        vision_keep_rate=args.vision_keep_rate,
        output_keep_rate=args.output_keep_rate,
        sweep_keep_rates=tuple(args.sweep_keep_rates),
        sweep_batch_size=args.sweep_batch_size,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
    )
    json_path = args.output or f"bench-{args.preset}.json"
    plot_path = args.plot or f"bench-{args.preset}.png"
    try:
        settings.validate()
        sweep = settings.sweep_keep_rates and not args.analytic_only
        for path in [json_path] + ([plot_path] if sweep else []):
            if os.path.exists(path) and not args.force:  # fail before a long run, not after it
                raise FileExistsError(f"{path} already exists; pass --force to overwrite")
        results = analytic_results(settings) if args.analytic_only else run_benchmark(settings)
        written = write_outputs(results, json_path, plot_path, force=args.force)
    except (ValueError, FileExistsError, ImportError) as error:
        print(f"dynamic-llava bench: error: {error}", file=sys.stderr)
        return 1
    print(markdown_report(results))
    print(f"Wrote {', '.join(written)}")
    return 0


def add_demo_commands(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="the shipped demo model answers questions about generated pictures, keeping 20%% of each picture",
        description="Loads the demo model shipped with the package (a small Dynamic-LLaVA trained on a synthetic "
        "task), asks questions about a few generated pictures in one batched generate() call, prints the answers "
        "beside the truth and the sparsity report, and writes a PNG showing which image patches the model kept.",
    )
    demo.add_argument("--model", help="model folder (default: the shipped demo model)")
    demo.add_argument("--num-images", type=int, default=3)
    demo.add_argument("--seed", type=int, default=None, help="seed of the pictures (default: a fixed demo seed)")
    demo.add_argument("--vision-keep-rate", type=float, help="override the model's vision keep rate")
    demo.add_argument("--vision-selector", choices=("learned", "random", "fastv"), help="default: learned")
    demo.add_argument("--output", default="dynamic-llava-demo.png", help="PNG of the kept patches")
    demo.add_argument("--force", action="store_true", help="overwrite --output")

    train = commands.add_parser(
        "train-demo",
        help="train the demo model from scratch on the synthetic task (stage 1 LLaVA, stage 2 Dynamic-LLaVA)",
    )
    train.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vision-steps", type=int, help="vision-tower pre-training steps (default: the recipe's)")
    train.add_argument("--stage1-steps", type=int, help="default: the shipped model's recipe")
    train.add_argument("--stage2-steps", type=int, help="default: the shipped model's recipe")
    train.add_argument("--batch-size", type=int, help="default: the shipped model's recipe")
    train.add_argument("--tiny", action="store_true", help="a much smaller model (smoke tests)")
    train.add_argument("--force", action="store_true", help="train into a non-empty --out")
    train.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser(
        "eval",
        help="held-out accuracy per selector and vision keep rate, description quality with output gating on/off",
    )
    evaluate.add_argument("--model", help="model folder (default: the shipped demo model)")
    evaluate.add_argument("--out", default="eval", help="folder for eval.json, eval.md and the PNG plots")
    evaluate.add_argument("--samples-per-kind", type=int, default=100)
    evaluate.add_argument("--describe-samples", type=int, default=100)
    evaluate.add_argument("--seed", type=int, help="seed of the held-out samples (default: never used in training)")
    evaluate.add_argument("--force", action="store_true", help="overwrite existing outputs")
    evaluate.add_argument("--no-progress", action="store_true")


def run_demo_command(args) -> int:
    from .demo import DEMO_SEED, print_demo, run_demo, save_overlays

    sparsity = {}
    if args.vision_keep_rate is not None:
        sparsity["vision_keep_rate"] = args.vision_keep_rate
    if args.vision_selector is not None:
        sparsity["vision_selector"] = args.vision_selector
    try:
        if os.path.exists(args.output) and not args.force:
            raise FileExistsError(f"{args.output} already exists; pass --force to overwrite it or pick --output")
        result = run_demo(args.model, args.num_images, DEMO_SEED if args.seed is None else args.seed, sparsity or None)
        print_demo(result)
        path = save_overlays(result, args.output, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"dynamic-llava demo: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {path}: each picture, then the same picture with the dropped patches darkened")
    return 0


def run_train_demo(args) -> int:
    import dataclasses

    from .train_demo import STAGE1, STAGE2, VISION_PRETRAINING, train_demo

    vision, stage1, stage2 = VISION_PRETRAINING, STAGE1, STAGE2
    if args.vision_steps is not None:
        vision = dataclasses.replace(vision, steps=args.vision_steps)
    if args.stage1_steps is not None:
        stage1 = dataclasses.replace(stage1, steps=args.stage1_steps)
    if args.stage2_steps is not None:
        stage2 = dataclasses.replace(stage2, steps=args.stage2_steps)
    if args.batch_size is not None:
        stage1 = dataclasses.replace(stage1, batch_size=args.batch_size)
        stage2 = dataclasses.replace(stage2, batch_size=args.batch_size)
    try:
        log = train_demo(
            args.out,
            seed=args.seed,
            stage1=stage1,
            stage2=stage2,
            vision=vision,
            progress=not args.no_progress,
            force=args.force,
            tiny=args.tiny,
        )
    except (FileExistsError, ValueError) as error:
        print(f"dynamic-llava train-demo: error: {error}", file=sys.stderr)
        return 1
    seconds = log["stage1"]["vision_pretraining"]["wall_seconds"] + log["stage1"]["wall_seconds"]
    minutes = (seconds + log["stage2"]["wall_seconds"]) / 60
    print(f"Wrote {args.out} (trained in {minutes:.1f} min). Evaluate it with: dynamic-llava eval --model {args.out}")
    return 0


def run_eval_command(args) -> int:
    from .evaluate import EVAL_SEED, EvalSettings, check_outputs_free, markdown_report, run_eval, write_outputs

    settings = EvalSettings(
        model=args.model,
        seed=EVAL_SEED if args.seed is None else args.seed,
        samples_per_kind=args.samples_per_kind,
        describe_samples=args.describe_samples,
        progress=not args.no_progress,
    )
    try:
        if not args.force:
            check_outputs_free(args.out)  # fail before a long run, not after it
        results, overlay = run_eval(settings)
        written = write_outputs(results, overlay, args.out, force=args.force)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"dynamic-llava eval: error: {error}", file=sys.stderr)
        return 1
    print(markdown_report(results))
    print(f"Wrote {', '.join(written)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynamic-llava", description="Dynamic-LLaVA for Hugging Face Transformers")
    commands = parser.add_subparsers(dest="command", required=True)

    add_demo_commands(commands)

    check = commands.add_parser(
        "check-reference", help="compare against the official implementation's outputs on the tiny reference"
    )
    check.add_argument(
        "reference_dir", help="folder with checkpoint/ and reference.pt (shared/reference/original_tiny)"
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")

    add_convert_command(commands)
    add_bench_command(commands)

    args = parser.parse_args(argv)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "demo":
        return run_demo_command(args)
    if args.command == "train-demo":
        return run_train_demo(args)
    if args.command == "eval":
        return run_eval_command(args)
    from .reference_check import check_reference  # imported late: torch and transformers load slowly

    results = check_reference(args.reference_dir)
    ok = all(r["tokens_match"] and r["kv_lengths_match"] and r["max_logit_diff"] <= 1e-4 for r in results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("scenario     sample   tokens  KV lengths  max |logit diff|")
        for r in results:
            print(
                f"{r['scenario']:<12} {r['sample']:<8} {'ok' if r['tokens_match'] else 'DIFF':<7} "
                f"{'ok' if r['kv_lengths_match'] else 'DIFF':<11} {r['max_logit_diff']:.2e}"
            )
        print("all match" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
