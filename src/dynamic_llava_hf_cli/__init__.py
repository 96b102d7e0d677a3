"""`dynamic-llava`, the command line of dynamic-llava-hf.

It lives beside `dynamic_llava_hf`, not inside it: importing `dynamic_llava_hf` registers its classes with
transformers' Auto classes, which loads torch and transformers (seconds), while `dynamic-llava --help` or a mistyped
option should answer at once. So this module imports only the standard library, and each command imports what it
needs when it runs. Bad paths and values end in a one-line error and a non-zero exit code, not a traceback.
"""

import argparse
import json
import os
import sys


# Names the commands accept, kept here because importing their home loads torch; tests check that they agree.
# dynamic_llava_hf.bench.PRESETS:
BENCH_PRESETS = ("tiny", "cpu-7b-topology", "host-bound", "llava-1.5-7b", "llava-1.5-13b")
VISION_SELECTORS = ("learned", "random", "fastv")  # configuration_dynamic_llava.VISION_SELECTORS

# Errors a user can cause and fix (a missing file, a bad value, a missing optional dependency): reported in one line.
USER_ERRORS = (OSError, ValueError, ImportError)


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` that reports a bad option in one line instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------------------------
# Option types: argparse turns their ArgumentTypeError into a one-line error naming the option.


def positive_int(text: str) -> int:
    value = int_value(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int_value(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def int_value(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def keep_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def existing_folder(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text


# ---------------------------------------------------------------------------------------------------------------------
# demo, train-demo, eval


def add_demo_commands(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="the shipped demo model answers questions about generated pictures, keeping 20%% of each picture",
        description="Loads the demo model shipped with the package (a small Dynamic-LLaVA trained on a synthetic "
        "task), asks questions about a few generated pictures in one batched generate() call, prints the answers "
        "beside the truth and the sparsity report, and writes a PNG showing which image patches the model kept.",
    )
    demo.add_argument("--model", help="model folder (default: the shipped demo model)")
    demo.add_argument("--num-images", type=positive_int, default=3, help="generated pictures to ask about")
    demo.add_argument("--seed", type=non_negative_int, help="seed of the pictures (default: a fixed demo seed)")
    demo.add_argument("--vision-keep-rate", type=keep_rate, help="override the model's vision keep rate")
    demo.add_argument(
        "--vision-selector", choices=VISION_SELECTORS, help="how image tokens are kept (default: learned)"
    )
    demo.add_argument("--output", default="dynamic-llava-demo.png", help="PNG of the kept patches")
    demo.add_argument("--force", action="store_true", help="overwrite --output")
    demo.set_defaults(run=run_demo_command)

    train = commands.add_parser(
        "train-demo",
        help="train the demo model from scratch on the synthetic task (stage 1 LLaVA, stage 2 Dynamic-LLaVA)",
    )
    train.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    train.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data and the initialisation")
    train.add_argument(
        "--vision-steps", type=positive_int, help="vision-tower pre-training steps (default: the recipe's)"
    )
    train.add_argument("--stage1-steps", type=positive_int, help="stage 1 steps (default: the shipped model's recipe)")
    train.add_argument("--stage2-steps", type=positive_int, help="stage 2 steps (default: the shipped model's recipe)")
    train.add_argument("--batch-size", type=positive_int, help="batch size of both stages (default: the recipe's)")
    train.add_argument("--tiny", action="store_true", help="a much smaller model (smoke tests)")
    train.add_argument("--force", action="store_true", help="train into a non-empty --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=run_train_demo)

    evaluate = commands.add_parser(
        "eval",
        help="held-out accuracy per selector and vision keep rate, description quality with output gating on/off",
    )
    evaluate.add_argument("--model", help="model folder (default: the shipped demo model)")
    evaluate.add_argument("--out", default="eval", help="folder for eval.json, eval.md and the PNG plots")
    evaluate.add_argument(
        "--samples-per-kind", type=positive_int, default=100, help="held-out questions per question kind"
    )
    evaluate.add_argument("--describe-samples", type=positive_int, default=100, help="held-out pictures to describe")
    evaluate.add_argument(
        "--seed", type=non_negative_int, help="seed of the held-out samples (default: never used in training)"
    )
    evaluate.add_argument("--force", action="store_true", help="overwrite existing outputs")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(run=run_eval_command)


def run_demo_command(args) -> int:
    from dynamic_llava_hf.demo import DEMO_SEED, print_demo, run_demo, save_overlays

    sparsity = {}
    if args.vision_keep_rate is not None:
        sparsity["vision_keep_rate"] = args.vision_keep_rate
    if args.vision_selector is not None:
        sparsity["vision_selector"] = args.vision_selector
    if os.path.exists(args.output) and not args.force:
        raise FileExistsError(f"{args.output} already exists; pass --force to overwrite it or pick --output")
    result = run_demo(args.model, args.num_images, DEMO_SEED if args.seed is None else args.seed, sparsity or None)
    print_demo(result)
    path = save_overlays(result, args.output, force=args.force)
    print(f"Wrote {path}: each picture, then the same picture with the dropped patches darkened")
    return 0


def run_train_demo(args) -> int:
    import dataclasses

    from dynamic_llava_hf.train_demo import STAGE1, STAGE2, VISION_PRETRAINING, train_demo

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
    seconds = log["stage1"]["vision_pretraining"]["wall_seconds"] + log["stage1"]["wall_seconds"]
    minutes = (seconds + log["stage2"]["wall_seconds"]) / 60
    print(f"Wrote {args.out} (trained in {minutes:.1f} min). Evaluate it with: dynamic-llava eval --model {args.out}")
    return 0


def run_eval_command(args) -> int:
    from dynamic_llava_hf.evaluate import (
        EVAL_SEED,
        EvalSettings,
        check_outputs_free,
        markdown_report,
        run_eval,
        write_outputs,
    )

    settings = EvalSettings(
        model=args.model,
        seed=EVAL_SEED if args.seed is None else args.seed,
        samples_per_kind=args.samples_per_kind,
        describe_samples=args.describe_samples,
        progress=not args.no_progress,
    )
    if not args.force:
        check_outputs_free(args.out)  # fail before a long run, not after it
    results, overlay = run_eval(settings)
    written = write_outputs(results, overlay, args.out, force=args.force)
    print(markdown_report(results))
    print(f"Wrote {', '.join(written)}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# check-reference


def add_check_reference_command(commands) -> None:
    check = commands.add_parser(
        "check-reference", help="compare against the official implementation's outputs on the tiny reference"
    )
    check.add_argument(
        "reference_dir",
        type=existing_folder,
        help="folder with checkpoint/ and reference.pt (shared/reference/original_tiny)",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(run=run_check_reference)


def run_check_reference(args) -> int:
    from dynamic_llava_hf.reference_check import check_reference

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


# ---------------------------------------------------------------------------------------------------------------------
# convert


def add_convert_command(commands, with_config_options: bool) -> None:
    convert = commands.add_parser("convert", help="convert a checkpoint into a self-contained Dynamic-LLaVA folder")
    sources = convert.add_subparsers(dest="source", required=True, metavar="{original,llava-hf}")
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
    llava_hf.add_argument("--seed", type=non_negative_int, default=0, help="seed of the predictors' initialisation")
    for parser in (original, llava_hf):
        parser.add_argument(
            "src", help="source checkpoint: a folder, or a Hub repo id (configs, tokenizer and weights are fetched)"
        )
        parser.add_argument("dst", help="output folder (must not exist unless --force)")
        parser.add_argument(
            "--dtype", help="cast the weights: a torch dtype name (bfloat16, float16, float32, ...) or auto (keep)"
        )
        parser.add_argument("--force", action="store_true", help="replace DST (only once the conversion succeeded)")
        parser.add_argument(
            "--allow-pickle", action="store_true", help="also read pytorch_model*.bin (unpickling: trusted files only)"
        )
        parser.add_argument("--base-model", help="Hub id of the source, for the model card's base_model")
        parser.add_argument("--license", help="license for the model card (default: other)")
        parser.add_argument("--model-id", help="Hub id used in the model card's code (default: DST)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        parser.add_argument(
            "--push-to-hub", metavar="REPO_ID", help="after a verified conversion, upload DST to this Hub model repo"
        )
        if with_config_options:
            add_config_options(parser)
        parser.set_defaults(run=run_convert)


def add_config_options(parser) -> None:
    """One option per field that `DynamicLlavaConfig` adds to `LlavaConfig`, of the type of the field's default and
    explained by the field's entry in the class docstring; booleans get `--FLAG` / `--no-FLAG`. Unset options keep
    the source's value (or the config default)."""
    import dataclasses

    from transformers.utils.auto_docstring import parse_docstring

    from dynamic_llava_hf import DynamicLlavaConfig

    documented, _ = parse_docstring(DynamicLlavaConfig.__doc__)
    group = parser.add_argument_group("sparsification settings (DynamicLlavaConfig fields)")
    for field in dataclasses.fields(DynamicLlavaConfig):
        if field.name not in DynamicLlavaConfig.__annotations__:  # LlavaConfig's fields
            continue
        description = " ".join(documented[field.name]["description"].split()).replace("%", "%%")
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=description)
        else:
            group.add_argument(flag, type=type(field.default), help=description)


def config_overrides(args) -> dict:
    """The `DynamicLlavaConfig` fields set on the command line (see `add_config_options`)."""
    from dynamic_llava_hf import DynamicLlavaConfig

    return {
        name: getattr(args, name) for name in DynamicLlavaConfig.__annotations__ if getattr(args, name) is not None
    }


def run_convert(args) -> int:
    from dynamic_llava_hf.convert import convert_llava_hf_checkpoint, convert_original_checkpoint

    common = {
        "dtype": args.dtype,
        "force": args.force,
        "allow_pickle": args.allow_pickle,
        "base_model": args.base_model,
        "license": args.license,
        "model_id": args.model_id,
        "progress": not args.no_progress,
        **config_overrides(args),
    }
    src = fetch_source(args.src, args.allow_pickle)
    if args.source == "original":
        result = convert_original_checkpoint(src, args.dst, vision_tower=args.vision_tower, **common)
    else:
        result = convert_llava_hf_checkpoint(src, args.dst, processor=args.processor, seed=args.seed, **common)
    print(f"Wrote {result.dst}: {result.num_tensors} tensors, verified.")
    if result.new_keys:
        if args.predictors_trained:
            print(f"{len(result.new_keys)} predictor tensors are freshly initialised and used by default: train them.")
        else:
            print(
                f"{len(result.new_keys)} predictor tensors are freshly initialised, so the model runs as the source "
                "Llava until they are trained (or until sparsity=True / predictors_trained=True asks for them)."
            )
    if not result.processor_written:
        print("No tokenizer in the source: no processor files written (see the model card).")
    if args.push_to_hub:
        print(f"Uploaded to {push_to_hub(result.dst, args.push_to_hub)}")
    return 0


# What a conversion reads from a Hub repo: configs, tokenizer and processor files, safetensors weights.
HUB_SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def fetch_source(src: str, allow_pickle: bool) -> str:
    """SRC as given, or the local copy of the Hub repository it names (see `convert.reading.local_or_hub_folder`)."""
    from dynamic_llava_hf.convert.reading import local_or_hub_folder

    folder = local_or_hub_folder(src, HUB_SOURCE_PATTERNS + (["*.bin"] if allow_pickle else []))
    if folder != src:
        print(f"Fetched {src} from the Hub: {folder}")
    return folder


def push_to_hub(folder: str, repo_id: str) -> str:
    """Uploads a converted folder to a Hub model repo (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload Dynamic-LLaVA conversion")
    return str(getattr(commit, "commit_url", commit))


# ---------------------------------------------------------------------------------------------------------------------
# bench


def add_bench_command(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="prefill/decoding speed, KV memory and FLOPs against transformers' Llava (same random weights)",
        description="Builds a model of the preset's shape with random weights, shares them with transformers' "
        "LlavaForConditionalGeneration and measures both alternately. Writes a JSON file and a PNG plot of the "
        "prefill keep-rate sweep, and prints Markdown tables. Empty lists (e.g. `--decode-batch-sizes` with no "
        "value) skip that part. Unset options take the preset's defaults.",
    )
    bench.add_argument(
        "--preset", choices=BENCH_PRESETS, default="tiny", help="model shape (tiny: a smoke test of about a minute)"
    )
    bench.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    bench.add_argument(
        "--dtype",
        help="a torch dtype name (bfloat16, float16, float32, ...); default or auto: bf16 on cuda, fp32 on cpu",
    )
    bench.add_argument(
        "--attn-implementation", choices=("sdpa", "eager"), default="sdpa", help="attention kernel of both models"
    )
    bench.add_argument("--prefill-batch-sizes", type=int, nargs="*", help="batch sizes of the prefill timing")
    bench.add_argument("--decode-batch-sizes", type=int, nargs="*", help="batch sizes of the decoding timing")
    bench.add_argument("--new-tokens", type=int, nargs="*", help="generated tokens per decoding point")
    bench.add_argument("--repeats", type=int, help="timed prefill runs per point (median)")
    bench.add_argument("--warmup", type=int, help="untimed prefill runs per point")
    bench.add_argument("--decode-repeats", type=int, help="timed generations per decoding point")
    bench.add_argument("--vision-keep-rate", type=float, help="share of image tokens kept (default: the config's)")
    bench.add_argument("--output-keep-rate", type=float, help="calibration target of the output keep rate")
    bench.add_argument(
        "--output-keep-pattern",
        choices=("calibrated", "alternate"),
        help="calibrated (default): the random output-text predictor, biased to keep --output-keep-rate of all "
        "generated tokens (rows differ widely); alternate: a fixed rule keeping every other generated token of every "
        "row (0.5 per row, labelled in the report)",
    )
    bench.add_argument("--sweep-keep-rates", type=float, nargs="*", help="vision keep rates of the prefill sweep")
    bench.add_argument("--sweep-batch-size", type=int, help="batch size of the prefill sweep")
    bench.add_argument("--seed", type=int, help="seed of the random weights and inputs")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    bench.add_argument(
        "--baselines",
        nargs="*",
        choices=("static", "compiled"),
        help="transformers Llava variants measured besides its default cache: static (cache_implementation="
        "'static') and compiled (static cache + compile_config); default both",
    )
    bench.add_argument(
        "--our-modes",
        nargs="*",
        choices=("static", "compiled"),
        help="Dynamic-LLaVA variants measured besides its default cache: static (cache_implementation='static', "
        "fixed-capacity) and compiled (that cache + compile_config); default both",
    )
    bench.add_argument("--compile-backend", help="torch.compile backend of the compiled runs (default inductor)")
    bench.add_argument(
        "--compile-dynamic",
        action=argparse.BooleanOptionalAction,
        help="compile the baseline once with dynamic shapes instead of once per decoding point (default: the "
        "preset's; tiny: dynamic)",
    )
    bench.add_argument(
        "--compile-prefill",
        action="store_true",
        default=None,
        help="our prefill with its decoder-layer loops, vision tower and image predictor compiled "
        "(model.compile_prefill, --compile-backend); the baseline's prefill stays eager, as generate() runs it",
    )
    bench.add_argument(
        "--compile-prefill-mode",
        help="torch.compile mode of --compile-prefill (default: inductor's default); reduce-overhead adds CUDA "
        "graphs on a GPU (then --warmup >= 2: the first call warms up, the second records)",
    )
    bench.add_argument("--output", help="JSON file (default: bench-PRESET.json)")
    bench.add_argument("--plot", help="PNG file of the keep-rate sweep (default: bench-PRESET.png)")
    bench.add_argument("--force", action="store_true", help="overwrite existing output files")
    bench.add_argument(
        "--analytic-only",
        action="store_true",
        help="only the analytic FLOPs (no weights built; any preset, any machine)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench.set_defaults(run=run_bench)


# `bench` options that are `BenchSettings` fields of the same name (lists become tuples).
BENCH_SETTINGS = (
    "preset",
    "device",
    "dtype",
    "attn_implementation",
    "prefill_batch_sizes",
    "decode_batch_sizes",
    "new_tokens",
    "repeats",
    "warmup",
    "decode_repeats",
    "vision_keep_rate",
    "output_keep_rate",
    "output_keep_pattern",
    "sweep_keep_rates",
    "sweep_batch_size",
    "seed",
    "threads",
    "baselines",
    "our_modes",
    "compile_backend",
    "compile_dynamic",
    "compile_prefill",
    "compile_prefill_mode",
)


def run_bench(args) -> int:
    from dynamic_llava_hf.bench import BenchSettings, analytic_results, markdown_report, run_benchmark, write_outputs

    given = {name: getattr(args, name) for name in BENCH_SETTINGS if getattr(args, name) is not None}
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}
    settings = BenchSettings(**given, progress=not args.no_progress)
    json_path = args.output or f"bench-{args.preset}.json"
    plot_path = args.plot or f"bench-{args.preset}.png"
    settings.validate()
    sweep = settings.sweep_keep_rates and not args.analytic_only
    for path in [json_path] + ([plot_path] if sweep else []):
        if os.path.exists(path) and not args.force:  # fail before a long run, not after it
            raise FileExistsError(f"{path} already exists; pass --force to overwrite")
    results = analytic_results(settings) if args.analytic_only else run_benchmark(settings)
    written = write_outputs(results, json_path, plot_path, force=args.force)
    print(markdown_report(results))
    print(f"Wrote {', '.join(written)}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# main


def build_parser(command: str | None = None) -> CommandParser:
    """The parser of every command. `convert`'s sparsification options are derived from `DynamicLlavaConfig`, whose
    import loads torch and transformers, so they are added only when `command` is "convert"."""
    parser = CommandParser(prog="dynamic-llava", description="Dynamic-LLaVA for Hugging Face Transformers")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_commands(commands)
    add_check_reference_command(commands)
    add_convert_command(commands, with_config_options=command == "convert")
    add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The top-level parser has no option taking a value, so the first word that is not an option is the command.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"dynamic-llava {args.command}: error: {error}", file=sys.stderr)
        return 1


__all__ = ["main"]
