"""`dynamic-llava eval`: held-out accuracy of a model on the synthetic task, per selector and vision keep rate.

Measures, on samples from a seed that training never uses:
- short answers (exact match, per kind and overall) at each vision keep rate for the learned predictor, a seeded
  random choice and the training-free FastV rule (keep 1.0 is the full context, the same for every selector), and
  the share of objects whose patch each selector keeps: of all objects, and of the one a question asks about;
- descriptions (exact match and word-level F1) with output-text gating on and off, the realised output keep rate
  and the stored KV bytes against a dense cache;
- the prefill FLOPs ratio against LLaVA at each keep rate (analytic, `flops.py`).
"""

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from .bench.flops import ModelShape, prefill_flops, total_flops
from .compat_dynamic_llava import CACHE_NAME
from .synthetic import LONG_KINDS, SHORT_KINDS, make_samples
from .utils import progress_bar


EVAL_SEED = 424242  # training draws from seeds 1 and 2 (train_demo.TRAIN_SEED and the next)
KEEP_RATES = (1.0, 0.5, 0.2, 0.1)
SELECTORS = ("learned", "random", "fastv")
# The longest short answer ("The triangle top right.") is 5 tokens and `</s>` (checked by the demo model's tests).
SHORT_ANSWER_TOKENS = 6


@dataclass
class EvalSettings:
    model: str | None = None  # folder; None: the shipped demo model
    seed: int = EVAL_SEED
    samples_per_kind: int = 100
    describe_samples: int = 100
    keep_rates: tuple[float, ...] = KEEP_RATES
    selectors: tuple[str, ...] = SELECTORS
    batch_size: int = 50
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


def normalize(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def token_f1(prediction: str, truth: str) -> float:
    """Bag-of-words F1 (SQuAD style) over words and punctuation marks."""
    predicted, expected = Counter(words(prediction)), Counter(words(truth))
    overlap = sum((predicted & expected).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(predicted.values()), overlap / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------------------------
# Running the model


def load_model(path: str | None = None):
    """The model (eval mode) and processor of a folder; default: the shipped demo model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .demo_model import demo_model_path

    path = str(path or demo_model_path())
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path)


def prompts_for(processor, questions: list[str]) -> list[str]:
    from .train_demo import chat_messages

    return [processor.apply_chat_template(chat_messages(q), add_generation_prompt=True) for q in questions]


@torch.inference_mode()
def generate_answers(model, processor, samples: list[dict], sparsity, max_new_tokens: int) -> tuple[list, list]:
    """Greedy answers of one batch and the cache's per-row sparsity report."""
    inputs = processor(
        text=prompts_for(processor, [s["question"] for s in samples]),
        images=[s["image"] for s in samples],
        padding=True,
        return_tensors="pt",
    )
    out = model.generate(
        **inputs,
        sparsity=sparsity,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    answers = [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers, out[CACHE_NAME].sparsity_report()


def batches(samples: list, size: int):
    for start in range(0, len(samples), size):
        yield start // size, samples[start : start + size]


def vision_sparsity(selector: str, keep_rate: float, batch_index: int) -> dict:
    sparsity = {"vision_keep_rate": keep_rate, "vision_selector": selector, "use_vision_predictor": keep_rate < 1.0}
    if selector == "random":
        sparsity["vision_selector_seed"] = batch_index  # a fresh draw for every batch
    return sparsity


@torch.inference_mode()
def patches_kept(model, processor, samples, selector, keep_rate, batch_size) -> dict:
    """Share of the objects whose patch the selector keeps (each object lies inside one patch; see `synthetic`):
    of all objects ("objects"), and of the objects the questions ask about ("subjects", one-object questions only)."""
    kept_objects = total = kept_subjects = subjects = 0
    for index, batch in batches(samples, batch_size):
        inputs = processor(
            text=prompts_for(processor, [s["question"] for s in batch]),
            images=[s["image"] for s in batch],
            padding=True,
            return_tensors="pt",
        )
        sparsity = vision_sparsity(selector, keep_rate, index)
        output = model(**inputs, sparsity=sparsity, use_cache=False, logits_to_keep=1)
        for kept, sample in zip(output.kept_image_token_indices, batch):
            kept = set(kept.tolist())
            kept_objects += sum(obj.patch_index in kept for obj in sample["objects"])
            total += len(sample["objects"])
            if sample["subject"] is not None:
                kept_subjects += sample["subject"].patch_index in kept
                subjects += 1
    return {"objects": kept_objects / total, "subjects": kept_subjects / subjects if subjects else None}


def short_answer_accuracy(model, processor, samples, selector, keep_rate, batch_size) -> dict:
    correct = Counter()
    total = Counter()
    for index, batch in batches(samples, batch_size):
        sparsity = vision_sparsity(selector, keep_rate, index)
        answers, _ = generate_answers(model, processor, batch, sparsity, SHORT_ANSWER_TOKENS)
        for sample, answer in zip(batch, answers):
            total[sample["kind"]] += 1
            correct[sample["kind"]] += normalize(answer) == normalize(sample["answer"])
    per_kind = {kind: correct[kind] / total[kind] for kind in total}
    return {"per_kind": per_kind, "overall": sum(correct.values()) / sum(total.values())}


def description_quality(model, processor, samples, gate_outputs: bool, batch_size: int) -> dict:
    """Descriptions at the model's default vision settings, output-text gating on or off."""
    exact, f1, kept, generated, stored, dense, gen_stored, gen_dense = [], [], 0, 0, 0, 0, 0, 0
    num_layers = model.config.text_config.num_hidden_layers
    sparse_layers = num_layers - model.config.sparse_layer
    for _, batch in batches(samples, batch_size):
        answers, report = generate_answers(
            model, processor, batch, {"use_output_text_predictor": gate_outputs}, max_new_tokens=96
        )
        for sample, answer, row in zip(batch, answers, report):
            exact.append(normalize(answer) == normalize(sample["answer"]))
            f1.append(token_f1(answer, sample["answer"]))
            kept += row["generated_tokens_kept"]
            generated += row["generated_tokens_total"]
            stored += row["stored_kv_bytes"]
            dense += row["dense_kv_bytes"]
            # The generated tokens' own entries: all layers below sparse_layer, the kept ones above.
            gen_stored += (num_layers - sparse_layers) * row["generated_tokens_total"]
            gen_stored += sparse_layers * row["generated_tokens_kept"]
            gen_dense += num_layers * row["generated_tokens_total"]
    return {
        "exact_match": sum(exact) / len(exact),
        "token_f1": sum(f1) / len(f1),
        "output_keep_rate": kept / generated if generated else 1.0,
        "kv_bytes_ratio": stored / dense,
        "generated_kv_ratio": gen_stored / gen_dense if gen_dense else 1.0,
    }


def prefill_flops_ratios(config, num_text_tokens: int, keep_rates) -> dict:
    shape = ModelShape.from_config(config)
    dense = total_flops(prefill_flops(shape, num_text_tokens, vision_keep_rate=None))
    return {
        str(rate): total_flops(prefill_flops(shape, num_text_tokens, vision_keep_rate=rate)) / dense
        for rate in keep_rates
        if rate < 1.0
    }


# ---------------------------------------------------------------------------------------------------------------------
# The whole evaluation


def eval_samples(settings: EvalSettings) -> tuple[list[dict], list[dict]]:
    """The held-out short-answer samples (the eval seed) and description samples (the next seed)."""
    short = make_samples(settings.samples_per_kind * len(SHORT_KINDS), settings.seed, SHORT_KINDS)
    return short, make_samples(settings.describe_samples, settings.seed + 1, LONG_KINDS)


def selector_overlays(model, processor, samples: list[dict], selectors, keep_rate: float):
    """One row per sample: the picture, then the patches each selector keeps at `keep_rate` (dropped ones dark)."""
    from .demo import enlarge, kept_image_patches, kept_patch_overlay, side_by_side

    patch_size = model.config.vision_config.patch_size
    rows = []
    for sample in samples:
        image = sample["image"]
        tiles = [enlarge(image)]
        for selector in selectors:
            sparsity = vision_sparsity(selector, keep_rate, 0)
            kept = kept_image_patches(model, processor, image, sample["question"], sparsity)
            tiles.append(kept_patch_overlay(image, kept, patch_size))
        rows.append(tiles)
    return side_by_side(rows)


def run_eval(settings: EvalSettings, model=None, processor=None):
    """Runs the whole evaluation; returns the results (JSON-able) and a PNG-ready sheet of kept patches per
    selector at vision keep 0.2."""
    if model is None:
        model, processor = load_model(settings.model)
    short, describe = eval_samples(settings)
    points = [(1.0, "full")] + [
        (rate, selector) for rate in settings.keep_rates if rate < 1.0 for selector in settings.selectors
    ]
    progress = progress_bar(total=len(points) + 2, desc="eval", enabled=settings.progress)
    accuracy = {}
    for rate, selector in points:
        selector_name = "learned" if selector == "full" else selector
        result = short_answer_accuracy(model, processor, short, selector_name, rate, settings.batch_size)
        if selector != "full":
            kept = patches_kept(model, processor, short, selector_name, rate, settings.batch_size)
            result["object_patches_kept"], result["asked_object_kept"] = kept["objects"], kept["subjects"]
        accuracy.setdefault(selector, {})[str(rate)] = result
        progress.update()
    description = {}
    for gate in (False, True):
        # One row at a time: in a batch, rows that have finished keep stepping (on padding) and would be counted.
        description["gating_on" if gate else "gating_off"] = description_quality(
            model, processor, describe, gate, batch_size=1
        )
        progress.update()
    progress.close()
    num_text_tokens = (
        processor(
            text=prompts_for(processor, [short[0]["question"]]), images=[short[0]["image"]], return_tensors="pt"
        )["input_ids"].shape[1]
        - model.config.image_seq_length
    )
    overlay = selector_overlays(model, processor, short[:4], settings.selectors, 0.2)
    results = {
        "settings": {**asdict(settings), "progress": False},
        "num_short_samples": len(short),
        "num_describe_samples": len(describe),
        "vision_keep_rate_default": model.config.vision_keep_rate,
        "accuracy": accuracy,
        "description": description,
        "prefill_flops_ratio": prefill_flops_ratios(model.config, num_text_tokens, settings.keep_rates),
        "overlay_columns": ["picture", *settings.selectors],
    }
    return results, overlay


# ---------------------------------------------------------------------------------------------------------------------
# Reports


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def markdown_report(results: dict) -> str:
    accuracy = results["accuracy"]
    rates = sorted(
        {rate for selector, by_rate in accuracy.items() if selector != "full" for rate in by_rate}, key=float
    )
    rates.reverse()
    kinds = list(accuracy["full"]["1.0"]["per_kind"])
    lines = [
        f"Short answers, held-out accuracy (%) over {results['num_short_samples']} questions "
        f"({len(kinds)} kinds); keep 1.0 = full context.",
        "",
        "| vision keep | selector | object patches kept | asked object kept | prefill FLOPs | overall | "
        + " | ".join(kinds)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(kinds),
    ]
    full = accuracy["full"]["1.0"]
    lines.append("| 1.0 | (full) | 100.0 | 100.0 | 1.00 | " + percent(full["overall"]) + " | ")
    lines[-1] += " | ".join(percent(full["per_kind"][kind]) for kind in kinds) + " |"
    for rate in rates:
        for selector in [s for s in SELECTORS if s in accuracy]:
            result = accuracy[selector][rate]
            flops = results["prefill_flops_ratio"].get(rate)
            lines.append(
                f"| {rate} | {selector} | {percent(result['object_patches_kept'])} | "
                f"{percent(result['asked_object_kept'])} | {flops:.2f} | "
                f"{percent(result['overall'])} | "
                + " | ".join(percent(result["per_kind"][kind]) for kind in kinds)
                + " |"
            )
    lines += [
        "",
        f"Descriptions ({results['num_describe_samples']} held-out images, vision keep "
        f"{results['vision_keep_rate_default']}, learned):",
        "",
        "| output-text gating | exact match % | word F1 % | output keep rate | KV bytes vs dense | "
        "generated tokens' KV vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results["description"].items():
        lines.append(
            f"| {name.split('_')[1]} | {percent(result['exact_match'])} | {percent(result['token_f1'])} | "
            f"{result['output_keep_rate']:.2f} | {result['kv_bytes_ratio']:.2f} | {result['generated_kv_ratio']:.2f} |"
        )
    return "\n".join(lines)


def plot_accuracy(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = results["accuracy"]
    full = 100 * accuracy["full"]["1.0"]["overall"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for selector in [s for s in SELECTORS if s in accuracy]:
        rates = sorted(float(rate) for rate in accuracy[selector])
        values = [100 * accuracy[selector][str(rate)]["overall"] for rate in rates]
        axis.plot(rates + [1.0], values + [full], marker="o", label=selector)
    axis.axhline(full, color="grey", linestyle="--", linewidth=1, label="full context")
    axis.set_xlabel("vision keep rate (share of each image's tokens kept)")
    axis.set_ylabel("short-answer accuracy (%)")
    axis.set_title("Held-out accuracy vs vision keep rate")
    axis.set_ylim(0, 102)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


OUTPUT_FILES = ("eval.json", "eval.md", "eval-accuracy.png", "eval-overlay.png")


def check_outputs_free(out_dir: str) -> None:
    existing = [os.path.join(out_dir, name) for name in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, name))]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --force to overwrite")


def write_outputs(results: dict, overlay, out_dir: str, force: bool = False) -> list[str]:
    if not force:
        check_outputs_free(out_dir)
    paths = [os.path.join(out_dir, name) for name in OUTPUT_FILES]
    os.makedirs(out_dir, exist_ok=True)
    with open(paths[0], "w") as file:
        json.dump(results, file, indent=1)
    with open(paths[1], "w") as file:
        file.write(markdown_report(results) + "\n")
    plot_accuracy(results, paths[2])
    overlay.save(paths[3])
    return paths
