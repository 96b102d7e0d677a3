"""`dynamic-llava demo`: the shipped demo model answers questions about generated pictures while it keeps only 20%
of each picture's tokens, and shows which ones it kept.

Everything runs from the installed package: the model folder is `demo_model_path()`, the pictures come from
`synthetic.py`, and prompts go through the model's own processor and chat template, as for any LLaVA-1.5 checkpoint.
"""

import os
import random

import torch
from PIL import Image, ImageDraw

from .synthetic import ask, random_scene, render_scene


DEMO_SEED = 2024  # not a training seed
DEMO_KINDS = ("describe", "color", "count", "position", "exists")
OVERLAY_SCALE = 4


def demo_questions(num_images: int, seed: int = DEMO_SEED, kinds=DEMO_KINDS) -> list[dict]:
    """`num_images` scenes with one question of each of `kinds` (where the scene allows it)."""
    questions = []
    for index in range(num_images):
        rng = random.Random(f"dynamic-llava-demo/{seed}/{index}")
        scene = random_scene(rng)
        image = render_scene(scene, rng)
        for kind in kinds:
            qa = ask(kind, scene, rng)
            if qa is not None:
                questions.append(
                    {"image_index": index, "image": image, "kind": kind, "question": qa[0], "answer": qa[1]}
                )
    return questions


def enlarge(image: Image.Image, scale: int = OVERLAY_SCALE) -> Image.Image:
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def kept_patch_overlay(
    image: Image.Image, kept: list[int], patch_size: int, scale: int = OVERLAY_SCALE
) -> Image.Image:
    """`image` enlarged `scale` times, dropped patches darkened, kept patches outlined."""
    grid = image.width // patch_size
    big = enlarge(image, scale)
    shade = Image.new("RGB", big.size, (0, 0, 0))
    mask = Image.new("L", big.size, 170)
    draw_mask = ImageDraw.Draw(mask)
    cell = patch_size * scale
    for index in kept:
        row, col = divmod(int(index), grid)
        draw_mask.rectangle((col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1), fill=0)
    overlay = Image.composite(shade, big, mask)
    draw = ImageDraw.Draw(overlay)
    for index in kept:
        row, col = divmod(int(index), grid)
        draw.rectangle((col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1), outline=(255, 255, 255))
    return overlay


def side_by_side(rows: list[list[Image.Image]], gap: int = 8) -> Image.Image:
    """Rows of equally sized tiles (e.g. picture, overlay) on a white sheet."""
    tile_width, tile_height = rows[0][0].size
    columns = max(len(row) for row in rows)
    sheet = Image.new(
        "RGB", (columns * (tile_width + gap) + gap, len(rows) * (tile_height + gap) + gap), (255, 255, 255)
    )
    for row_index, row in enumerate(rows):
        for column, tile in enumerate(row):
            sheet.paste(tile, (gap + column * (tile_width + gap), gap + row_index * (tile_height + gap)))
    return sheet


@torch.inference_mode()
def kept_image_patches(model, processor, image: Image.Image, question: str, sparsity=None) -> list[int]:
    """The image tokens the model keeps for this prompt: the prefill's real top-k (`kept_image_token_indices`)."""
    from .evaluate import prompts_for

    inputs = processor(text=prompts_for(processor, [question]), images=[image], return_tensors="pt")
    output = model(**inputs, sparsity=sparsity, use_cache=False, logits_to_keep=1)
    kept = output.kept_image_token_indices
    if kept is None:  # vision pruning off: everything is kept
        return list(range(model.config.image_seq_length))
    return kept[0].tolist()


def run_demo(model_path=None, num_images: int = 3, seed: int = DEMO_SEED, sparsity=None) -> dict:
    """Answers the demo questions in one batched `generate` call; returns rows and the per-image overlays."""
    from .evaluate import generate_answers, load_model, normalize

    model, processor = load_model(model_path)
    questions = demo_questions(num_images, seed)
    answers, report = generate_answers(model, processor, questions, sparsity, max_new_tokens=96)
    rows = []
    for item, answer, sparsity_row in zip(questions, answers, report):
        rows.append(
            {
                **{key: item[key] for key in ("image_index", "kind", "question", "answer")},
                "model_answer": answer,
                "correct": normalize(answer) == normalize(item["answer"]),
                **sparsity_row,
            }
        )
    patch_size = model.config.vision_config.patch_size
    overlays = []
    for index in range(num_images):
        first = next(item for item in questions if item["image_index"] == index)
        kept = kept_image_patches(model, processor, first["image"], first["question"], sparsity)
        overlays.append([enlarge(first["image"]), kept_patch_overlay(first["image"], kept, patch_size)])
    return {"rows": rows, "overlays": overlays, "model": model}


def print_demo(result: dict) -> None:
    current = None
    for row in result["rows"]:
        if row["image_index"] != current:
            current = row["image_index"]
            print(f"\nimage {current}: kept {row['image_tokens_kept']} of {row['image_tokens_total']} image tokens")
        mark = "ok " if row["correct"] else "XX "
        print(f"  {mark}Q: {row['question']}")
        print(f"     A: {row['model_answer']}")
        if not row["correct"]:
            print(f"     truth: {row['answer']}")
        if row["kind"] == "describe":
            print(
                f"     generated tokens whose KV was kept: {row['generated_tokens_kept']}/"
                f"{row['generated_tokens_total']}; stored KV {row['kv_bytes_ratio']:.2f}x a dense cache"
            )
    correct = sum(row["correct"] for row in result["rows"])
    print(f"\n{correct}/{len(result['rows'])} answers correct")


def save_overlays(result: dict, path: str, force: bool = False) -> str:
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or --output to pick another file")
    side_by_side(result["overlays"]).save(path)
    return path


__all__ = ["demo_questions", "kept_patch_overlay", "run_demo"]
