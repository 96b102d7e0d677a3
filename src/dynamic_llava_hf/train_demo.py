"""`dynamic-llava train-demo`: trains the demo model on the synthetic task, both stages, on a CPU.

- Stage 1, "LLaVA-1.5", everything from scratch, in the order LLaVA-1.5 was built: (a) the vision tower alone learns
  to name each patch's object (a stand-in for CLIP's pre-training), then (b) projector and Llama are trained with full
  context on the frozen tower, no predictors.
- Stage 2, Dynamic-LLaVA (the paper's recipe, at this scale): the predictors are added, the vision tower and
  projector frozen, the LLM trained at a low learning rate and the predictors at a high one, Gumbel temperature
  annealed 1 -> 0.1, keep-rate losses towards 0.2 (image) and 0.5 (output text).

Stages 1b and 2 use the package's public training API (`DynamicLlavaTrainer`, `DynamicLlavaTrainingArguments`,
`data.tokenize_conversation`, `data.LlavaDataCollator`). Samples are drawn on the fly from `synthetic.make_sample`,
a fresh one for every step, from a seed that evaluation never uses.
"""

import json
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from .train.data import LlavaDataCollator, tokenize_conversation
from .demo_model import build_demo_processor, demo_config, demo_generation_config
from .evaluate import EVAL_SEED, generate_answers
from .modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from .synthetic import (
    COLORS,
    IMAGE_SIZE,
    LONG_KINDS,
    PATCH_SIZE,
    POSITIONS,
    SHAPES,
    SHORT_KINDS,
    SIZES,
    make_sample,
    make_samples,
)
from .train.calibration import calibrate_output_text_predictor
from .train.trainer import DynamicLlavaTrainer, DynamicLlavaTrainingArguments
from .training_dynamic_llava import IGNORE_INDEX
from .utils import progress_bar


TRAIN_SEED = 1  # evaluation and the CI fixture use other seeds
# Each sample's kind comes from its index (`make_sample`): every batch holds each of these about equally often.
TRAINING_KINDS = SHORT_KINDS + LONG_KINDS


@dataclass
class StageSettings:
    steps: int
    batch_size: int
    learning_rate: float
    predictor_lr: float = 0.0
    warmup_ratio: float = 0.05


# Stage 1a's grid-cell head at full weight set the tower back: its loss sat at chance for 100 steps, then shape
# accuracy on object patches ended at 81% after 300 steps (99.5% without that head), and the language model, which
# finds objects by shape, stayed near chance. At 0.1 shapes stay at 99.5% and the cell is learned a little later.
CELL_LOSS_WEIGHT = 0.1

# Initial weight std of the projector and the Llama in stage 1b (transformers' default: 0.02). From 0.02, stage 1b sat
# at chance for 700 to 1,400+ steps, depending on the seed, before it found the objects the questions name; from 0.06
# both seeds tried left chance within 200-400 steps.
STAGE1_INIT_STD = 0.06

# The shipped model's recipe (`--seed 1`; 77 minutes on one core of the 2-core CPU machine, the other core busy).
VISION_PRETRAINING = StageSettings(steps=600, batch_size=64, learning_rate=2e-3)
STAGE1 = StageSettings(steps=3200, batch_size=32, learning_rate=5e-4)
STAGE2 = StageSettings(steps=500, batch_size=32, learning_rate=1e-4, predictor_lr=1e-3)


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    """One user turn with the image in front of the question, as the processor's chat template expects."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class SyntheticConversationDataset(torch.utils.data.Dataset):
    """`length` training samples of the synthetic task as `input_ids`, `labels` (answers only) and `pixel_values`."""

    def __init__(self, processor, length: int, seed: int = TRAIN_SEED):
        self.processor = processor
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        sample = make_sample(self.seed, index, TRAINING_KINDS, min_objects=1)
        return conversation_features(sample, self.processor)


def conversation_features(sample: dict, processor) -> dict:
    """A synthetic sample as the model trains on it: `input_ids`, `labels` (the answer only) and `pixel_values`."""
    input_ids, labels = tokenize_conversation(
        chat_messages(sample["question"], sample["answer"]),
        processor,
        (IMAGE_SIZE // PATCH_SIZE) ** 2,
        max_length=processor.tokenizer.model_max_length,
    )
    pixel_values = processor.image_processor(sample["image"], return_tensors="pt")["pixel_values"][0]
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def training_arguments(out: str, stage: StageSettings, seed: int, progress: bool, **extra):
    return DynamicLlavaTrainingArguments(
        output_dir=out,
        max_steps=stage.steps,
        per_device_train_batch_size=stage.batch_size,
        learning_rate=stage.learning_rate,
        predictor_lr=stage.predictor_lr or stage.learning_rate,
        weight_decay=0.0,
        warmup_steps=stage.warmup_ratio,  # a float < 1 is a share of the steps
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        logging_steps=max(stage.steps // 20, 1),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential",  # samples are random draws already; in order, kinds stay balanced
        **extra,
    )


def heldout_batches(processor, samples_per_kind: int, seed: int = EVAL_SEED + 2) -> dict:
    """Held-out short questions as training batches, one per kind. The default seed is neither a training seed nor
    the eval's (EVAL_SEED: short answers, EVAL_SEED + 1: descriptions)."""
    collate = LlavaDataCollator(processor.tokenizer.pad_token_id)
    return {
        kind: collate(
            [conversation_features(sample, processor) for sample in make_samples(samples_per_kind, seed, kind)]
        )
        for kind in SHORT_KINDS
    }


@torch.inference_mode()
def teacher_forced_accuracy(model, batches: dict) -> dict:
    """Share of the `heldout_batches` questions whose every answer token is the model's top token given the true
    prefix, per kind and overall, with full context: a quick check (no generation) of what a stage has learned."""
    was_training = model.training
    model.eval()
    per_kind = {}
    for kind, batch in batches.items():
        batch = {key: value.to(model.device) for key, value in batch.items()}
        logits = model(**batch, use_cache=False, sparsity={"use_vision_predictor": False}).logits
        labels = batch["labels"][:, 1:]
        correct = (logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE_INDEX)
        per_kind[kind] = float(correct.all(-1).float().mean())
    model.train(was_training)
    return {"per_kind": per_kind, "overall": sum(per_kind.values()) / len(per_kind)}


class HeldOutAccuracyCallback(TrainerCallback):
    """Every `every` steps, teacher-forced accuracy on a few held-out short questions per kind (the same ones each
    time) goes into the log history (and on screen): how the stage is doing beyond its loss, which descriptions
    dominate."""

    def __init__(self, processor, every: int, samples_per_kind: int = 30):
        self.batches = heldout_batches(processor, samples_per_kind)
        self.every = every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            accuracy = teacher_forced_accuracy(model, self.batches)
            entry = {"step": state.global_step, "heldout_teacher_forced": accuracy["per_kind"]}
            state.log_history.append(entry)
            if not args.disable_tqdm:
                print(entry, flush=True)


def run_stage(model, processor, args, seed: int, heldout_every: int = 0) -> dict:
    """Trains `model` in place on the samples of stream `seed`; returns the stage's log (Trainer log history, wall
    time, `data_seed`). The Trainer's `output_dir` is only a scratch folder (nothing is checkpointed)."""
    length = args.max_steps * args.per_device_train_batch_size
    dataset = SyntheticConversationDataset(processor, length, seed)
    trainer = DynamicLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaDataCollator(processor.tokenizer.pad_token_id),
        callbacks=[HeldOutAccuracyCallback(processor, heldout_every)] if heldout_every else None,
    )
    start = time.perf_counter()
    trainer.train()
    return {
        "wall_seconds": round(time.perf_counter() - start, 1),
        "data_seed": seed,
        "log_history": trainer.state.log_history,
    }


def patch_labels(objects, num_patches: int) -> torch.LongTensor:
    """`[num_patches, 4]` class of each patch: colour, shape and size of the object it holds (0: no object), and, for
    a patch that holds an object, the cell of the 3x3 grid it lies in (what position questions name).

    Background patches get no cell label (IGNORE_INDEX): questions only ask where objects are."""
    side = IMAGE_SIZE // PATCH_SIZE
    labels = torch.zeros(num_patches, 4, dtype=torch.long)
    labels[:, 3] = IGNORE_INDEX
    for obj in objects:
        row, column = obj.patch
        cell = (row * 3 // side) * 3 + column * 3 // side  # row-major, like `synthetic.POSITIONS`
        labels[obj.patch_index] = torch.tensor(
            [list(COLORS).index(obj.color) + 1, SHAPES.index(obj.shape) + 1, list(SIZES).index(obj.size) + 1, cell]
        )
    return labels


def patch_accuracies(logits: list[torch.Tensor], labels: torch.LongTensor) -> dict:
    """Stage 1a's accuracy: of every label of every patch (a background patch has no cell label), and per label on
    the patches that hold an object (what the questions need)."""
    objects = labels[..., 0] > 0
    right = [logit.argmax(-1) == labels[..., i] for i, logit in enumerate(logits)]
    return {
        "patch_accuracy": float(torch.stack(right[:3] + [right[3] | ~objects]).all(0).float().mean()),
        "object_patch_accuracy": {
            name: float(right[i][objects].float().mean()) for i, name in enumerate(("color", "shape", "size", "cell"))
        },
    }


def pretrain_vision_tower(model, processor, stage: StageSettings, seed: int, progress: bool) -> dict:
    """Stands in for CLIP's pre-training: the vision tower learns to tell, for every patch, the colour, shape and
    size of the object it holds (or that it holds none) and, for an object, its grid cell, through linear heads on the
    features LLaVA reads. The heads are thrown away afterwards, as CLIP's projection heads are."""
    tower = model.model.vision_tower
    heads = torch.nn.ModuleList(
        torch.nn.Linear(model.config.vision_config.hidden_size, classes)
        for classes in (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1, len(POSITIONS))
    )
    weights = (1.0, 1.0, 1.0, CELL_LOSS_WEIGHT)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=stage.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, stage.learning_rate, total_steps=stage.steps, pct_start=stage.warmup_ratio
    )
    num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    log, start = [], time.perf_counter()
    tower.train()
    for step in progress_bar(range(stage.steps), desc="stage 1a: vision tower", enabled=progress):
        samples = [make_sample(seed, step * stage.batch_size + i, min_objects=1) for i in range(stage.batch_size)]
        pixels = processor.image_processor([s["image"] for s in samples], return_tensors="pt")["pixel_values"]
        labels = torch.stack([patch_labels(s["objects"], num_patches) for s in samples])
        states = tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        logits = [head(states) for head in heads]
        losses = [F.cross_entropy(lg.flatten(0, 1), labels[..., i].flatten()) for i, lg in enumerate(logits)]
        loss = sum(weight * part for weight, part in zip(weights, losses))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(stage.steps // 10, 1) == 0:
            log.append({"step": step + 1, "loss": loss.item(), **patch_accuracies(logits, labels)})
            if progress:
                print(log[-1])
    return {"wall_seconds": round(time.perf_counter() - start, 1), "log_history": log}


def train_stage1(
    processor,
    vision: StageSettings,
    stage: StageSettings,
    seed: int,
    progress: bool,
    size: str = "default",
):
    """Stage 1: the vision tower pre-trained alone, then LLaVA (projector and LLM) trained on it frozen."""
    torch.manual_seed(seed)
    config = demo_config(processor.tokenizer, size)
    config.text_config.initializer_range = STAGE1_INIT_STD  # projector and Llama; the vision tower has its own
    model = DynamicLlavaForConditionalGeneration(config)
    model.config._attn_implementation = "sdpa"
    vision_log = pretrain_vision_tower(model, processor, vision, seed + 2, progress)
    # LLaVA-1.5 trains the projector and the LLM on a frozen CLIP.
    model.model.vision_tower.requires_grad_(False)
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(scratch, stage, seed, progress)
        log = run_stage(model, processor, args, seed, heldout_every=max(stage.steps // 16, 1))
    return model, {**log, "init_std": STAGE1_INIT_STD, "vision_pretraining": vision_log}


def add_predictors(stage1_model, processor, seed: int, size: str = "default") -> DynamicLlavaForConditionalGeneration:
    """The stage-1 weights in a model with the Dynamic-LLaVA predictors (freshly initialised, as when converting)."""
    torch.manual_seed(seed)
    config = demo_config(processor.tokenizer, size, use_vision_predictor=True, use_output_text_predictor=True)
    model = DynamicLlavaForConditionalGeneration(config)
    model.config._attn_implementation = "sdpa"
    missing, unexpected = model.load_state_dict(stage1_model.state_dict(), strict=False)
    if unexpected or any("predictor" not in key for key in missing):
        raise RuntimeError(f"Stage-1 weights do not fit stage 2: missing {missing}, unexpected {unexpected}")
    return model


def train_stage2(stage1_model, processor, stage: StageSettings, seed: int, progress: bool, size: str = "default"):
    model = add_predictors(stage1_model, processor, seed, size)
    model.model.vision_tower.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(False)
    with tempfile.TemporaryDirectory() as scratch:
        args = training_arguments(scratch, stage, seed, progress, gumbel_start_tau=1.0, gumbel_end_tau=0.1)
        log = run_stage(model, processor, args, seed + 1)
    return model, log


CALIBRATION_DESCRIPTIONS = 64


def calibrate_output_gating(model, processor, seed: int, samples: int = CALIBRATION_DESCRIPTIONS) -> dict:
    """Sets the output-text predictor's threshold so that inference keeps the share of generated tokens it was
    trained to keep (`config.output_text_keep_rate`), measured on descriptions of stage 2's own training pictures
    (`seed`: the stage's sample stream); `model` in eval mode. See `train.calibration` for why the argmax alone
    keeps far fewer."""
    descriptions = make_samples(samples, seed, LONG_KINDS)

    def describe_each():
        # One at a time: rows of a batch that have finished would go on feeding padding to the predictor.
        for sample in descriptions:
            generate_answers(model, processor, [sample], {"use_output_text_predictor": True}, max_new_tokens=96)

    return calibrate_output_text_predictor(model, describe_each, model.config.output_text_keep_rate)


def train_demo(
    out: str,
    seed: int = 0,
    stage1: StageSettings = STAGE1,
    stage2: StageSettings = STAGE2,
    vision: StageSettings = VISION_PRETRAINING,
    progress: bool = True,
    force: bool = False,
    tiny: bool = False,
) -> dict:
    """Runs both stages and saves the Dynamic-LLaVA model, its processor and `training_log.json` into `out`.

    `tiny` trains a much smaller model (seconds per stage): a smoke test of the command, not a useful model.
    """
    if os.path.exists(out) and os.listdir(out) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass force=True (--force) to train into it anyway")
    processor = build_demo_processor()
    size = "tiny" if tiny else "default"
    stage1_model, log1 = train_stage1(processor, vision, stage1, seed + TRAIN_SEED, progress, size)
    # What each stage has learned, on held-out questions without generating (see the model card): a stage 1b that
    # stayed near chance shows here before stage 2 is spent on it.
    heldout = heldout_batches(processor, samples_per_kind=50)
    log1["teacher_forced_accuracy"] = teacher_forced_accuracy(stage1_model, heldout)
    model, log2 = train_stage2(stage1_model, processor, stage2, seed + TRAIN_SEED, progress, size)
    log2["teacher_forced_accuracy"] = teacher_forced_accuracy(model, heldout)
    if progress:
        for name, stage_log in (("stage 1b", log1), ("stage 2", log2)):
            print(f"{name}: teacher-forced accuracy {stage_log['teacher_forced_accuracy']['overall']:.1%}")
    model.eval()
    model.generation_config = demo_generation_config(model.config)
    calibration_samples = 4 if tiny else CALIBRATION_DESCRIPTIONS
    log2["output_calibration"] = calibrate_output_gating(model, processor, log2["data_seed"], calibration_samples)
    if progress:
        print(f"output-text predictor calibrated: {log2['output_calibration']}")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log = {
        "seed": seed,
        "size": size,
        "threads": torch.get_num_threads(),
        "stage1": {"settings": vars(stage1), "vision_settings": vars(vision), **log1},
        "stage2": {"settings": vars(stage2), **log2},
    }
    with open(os.path.join(out, "training_log.json"), "w") as file:
        json.dump(log, file, indent=1)
    with open(os.path.join(out, "README.md"), "w") as file:
        file.write(demo_model_card(log))
    return log


def stage_summary(stage_log: dict) -> str:
    entries = [entry for entry in stage_log["log_history"] if "loss" in entry]
    if not entries:
        return "no steps logged"
    first, last = entries[0], entries[-1]
    text = f"loss {first['loss']:.3f} -> {last['loss']:.3f}"
    if "image_keep_ratio" in last:
        text += f", image keep ratio {first['image_keep_ratio']:.2f} -> {last['image_keep_ratio']:.2f}"
    if "output_text_keep_ratio" in last:
        text += f", output-text keep ratio {last['output_text_keep_ratio']:.2f} (last log)"
    return text + f"; {stage_log['wall_seconds'] / 60:.1f} min"


def heldout_summary(stage_log: dict) -> str:
    """The held-out teacher-forced accuracy logged during the stage (mean over the short kinds), at a few steps."""
    entries = [entry for entry in stage_log["log_history"] if "heldout_teacher_forced" in entry]
    shown = entries[3::4] if len(entries) >= 8 else entries
    points = [
        f"{sum(e['heldout_teacher_forced'].values()) / len(e['heldout_teacher_forced']):.0%} @{e['step']}"
        for e in shown
    ]
    return " Held-out teacher-forced accuracy during the stage: " + ", ".join(points) + "."


def vision_summary(vision_log: dict) -> str:
    last = vision_log["log_history"][-1]
    per_label = ", ".join(f"{name} {value:.3f}" for name, value in last["object_patch_accuracy"].items())
    return (
        f"loss {last['loss']:.4f}, patch accuracy {last['patch_accuracy']:.3f} (on object patches: {per_label}) at "
        f"the end; {vision_log['wall_seconds'] / 60:.1f} min"
    )


def demo_model_card(log: dict, results_markdown: str | None = None) -> str:
    """The model card (README.md) of a `train-demo` folder; the shipped one adds the eval tables."""
    stage1, stage2 = log["stage1"], log["stage2"]
    vision = stage1["vision_settings"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [dynamic-llava, llava, synthetic, demo]",
        "---",
        "",
        "# Dynamic-LLaVA demo model (synthetic task)",
        "",
        "A small LLaVA-1.5-architecture model (CLIP-style ViT, 2-layer GELU projector, 6-layer Llama; about 4M",
        "parameters) trained from scratch by `dynamic-llava train-demo` on the procedurally generated picture",
        "questions of `dynamic_llava_hf.synthetic`, then turned into a Dynamic-LLaVA with the paper's recipe. It",
        "exists to show the method at work on pictures of coloured shapes: keeping 20% of each picture's 36 tokens",
        "and about half of its own answer tokens' KV cache. How well it answers is in the evaluation below.",
        "It knows nothing else: it is not a general vision-language model. Real checkpoints come from",
        "`dynamic-llava convert`.",
        "",
        "## Training",
        "",
        f"- Stage 1a (stands in for CLIP's pre-training): the vision tower alone learns each patch's object "
        f"colour, shape and size, and an object's grid cell (loss weight {CELL_LOSS_WEIGHT}), through linear heads "
        f"that are then dropped; {vision['steps']} "
        f"steps of batch "
        f"{vision['batch_size']}: {vision_summary(stage1['vision_pretraining'])}.",
        f"- Stage 1b (LLaVA-1.5, full context, on the frozen vision tower; projector and LLM from scratch with "
        f"initial weight std {stage1['init_std']}; pictures of 1 to 5 objects): {stage1['settings']['steps']} steps "
        f"of batch {stage1['settings']['batch_size']}, lr {stage1['settings']['learning_rate']}: "
        f"{stage_summary(stage1)}.{heldout_summary(stage1)}",
        f"- Stage 2 (Dynamic-LLaVA: predictors added, vision tower and projector frozen, LLM lr "
        f"{stage2['settings']['learning_rate']}, predictor lr {stage2['settings']['predictor_lr']}, Gumbel tau 1 -> "
        f"0.1, keep-rate targets 0.2 image / 0.5 output text): {stage2['settings']['steps']} steps of batch "
        f"{stage2['settings']['batch_size']}: {stage_summary(stage2)}.",
        f"- Seed {log['seed']}, {log['threads']} CPU thread(s); the full log is `training_log.json`.",
    ]
    calibration = stage2["output_calibration"]
    lines += [
        "- Teacher-forced accuracy on held-out short questions (every answer token right given the true prefix, full "
        f"context): after stage 1b {stage1['teacher_forced_accuracy']['overall']:.1%}, after stage 2 "
        f"{stage2['teacher_forced_accuracy']['overall']:.1%}.",
        f"- Then the output-text predictor's threshold was set so that its argmax keeps the share it was trained "
        f"to keep ({calibration['target_keep_rate']}) of {calibration['calibration_tokens']} generated tokens "
        f"of descriptions of stage-2 training pictures (the argmax had kept "
        f"{calibration['keep_rate_before']:.0%}; keep-logit shift {calibration['keep_logit_shift']:+.3f}; "
        f"`dynamic_llava_hf.train.calibration`).",
    ]
    if results_markdown:
        lines += ["", "## Held-out evaluation (`dynamic-llava eval`)", "", results_markdown]
    return "\n".join(lines) + "\n"
