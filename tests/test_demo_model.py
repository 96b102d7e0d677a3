"""The shipped demo model: a complete folder from the installed package, the Auto classes, the pipeline, remote code,
and held-out accuracy floors (full context and 20% of the image tokens)."""

import json
from pathlib import Path

import pytest
import torch
from test_remote_code import run_probe_without_package
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import dynamic_llava_hf
from dynamic_llava_hf import DynamicLlavaForConditionalGeneration, demo_model_path
from dynamic_llava_hf.demo_model import DEMO_PACKAGE_DATA, REMOTE_CODE_FILES
from dynamic_llava_hf.evaluate import (
    SHORT_ANSWER_TOKENS,
    description_quality,
    generate_answers,
    patches_kept,
    short_answer_accuracy,
)
from dynamic_llava_hf.synthetic import LONG_KINDS, SHORT_KINDS, make_samples


FIXTURE_SEED = 777  # neither a training seed (1-3) nor the eval seed
QUESTIONS_PER_KIND = 8  # 48 questions
# Floors a few questions below what the shipped model measures on this fixed set (the held-out eval on 600 questions
# is in the README: 97.7% with full context): full context 93.8% (45 of 48), learned selector at vision keep 0.2 95.8%,
# random 54.2%, FastV 95.8%; object patches kept at 0.2: learned 100%, random 18% (about 7/36 expected), FastV 100%.
MIN_FULL_ACCURACY = 0.9
MAX_DROP_AT_KEEP_02 = 0.03  # learned selector at vision keep 0.2 vs full context: at most one question lost
MIN_GAIN_OVER_RANDOM = 0.15  # learned vs random at keep 0.2 (measured: 41.7 points, 20 of 48 questions)
LEARNED_OBJECTS_KEPT = 0.95
RANDOM_OBJECTS_KEPT = 0.40
# (At keep 0.1, asked object kept: FastV 90.6%, learned 78.1%.) Descriptions, one at a time (measured on these 10:
# realised output keep 0.500, all 10 exact with gating on and off, the generated tokens' KV at 0.58 of dense).
DESCRIPTIONS = 10
OUTPUT_KEEP_RANGE = (0.4, 0.6)
MAX_F1_DROP_WITH_GATING = 0.02
MAX_GENERATED_KV_RATIO = 0.6


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return demo_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def demo(demo_folder):
    model = AutoModelForImageTextToText.from_pretrained(demo_folder).eval()
    return model, AutoProcessor.from_pretrained(demo_folder)


@pytest.fixture(scope="module")
def fixed_questions():
    return make_samples(QUESTIONS_PER_KIND * len(SHORT_KINDS), FIXTURE_SEED, SHORT_KINDS)


def test_the_package_ships_no_code_copy_and_the_folder_is_complete(demo_folder, tmp_path):
    shipped = Path(dynamic_llava_hf.__file__).parent / DEMO_PACKAGE_DATA
    assert not list(shipped.glob("*.py")), "remote-code copies in the package data would go stale"
    assert sum(entry.stat().st_size for entry in shipped.iterdir()) < 30 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md"):
        assert (demo_folder / name).is_file(), name
    for name in REMOTE_CODE_FILES:
        assert (demo_folder / name).read_bytes() == (shipped.parent / name).read_bytes()
    auto_map = json.loads((demo_folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    # Assembled once: a second call reuses the folder; another cache dir gets its own.
    assert demo_model_path(demo_folder.parent) == demo_folder
    assert [entry.name for entry in demo_folder.parent.iterdir()] == [demo_folder.name]
    elsewhere = demo_model_path(tmp_path)
    assert elsewhere.parent == tmp_path and elsewhere.name == demo_folder.name


def test_installed_auto_classes_load_it(demo):
    model, processor = demo
    assert type(model) is DynamicLlavaForConditionalGeneration
    assert model.config.use_vision_predictor and model.config.use_output_text_predictor
    assert model.config.vision_keep_rate == 0.2
    assert processor.tokenizer.padding_side == "left"
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_keep_02_costs_no_accuracy_and_the_predictor_keeps_the_objects(demo, fixed_questions):
    model, processor = demo
    full = short_answer_accuracy(model, processor, fixed_questions, "learned", 1.0, batch_size=48)
    learned = short_answer_accuracy(model, processor, fixed_questions, "learned", 0.2, batch_size=48)
    random = short_answer_accuracy(model, processor, fixed_questions, "random", 0.2, batch_size=48)
    assert full["overall"] >= MIN_FULL_ACCURACY, full
    assert learned["overall"] >= full["overall"] - MAX_DROP_AT_KEEP_02, (learned, full)
    assert learned["overall"] >= random["overall"] + MIN_GAIN_OVER_RANDOM, (learned, random)
    shares = {
        selector: patches_kept(model, processor, fixed_questions, selector, 0.2, batch_size=48)
        for selector in ("learned", "random", "fastv")
    }
    kept = {selector: share["objects"] for selector, share in shares.items()}
    assert kept["learned"] >= LEARNED_OBJECTS_KEPT, kept
    assert kept["random"] <= RANDOM_OBJECTS_KEPT, kept
    # The training-free rule finds the objects too, on this trained model's attention at `sparse_layer`.
    assert kept["fastv"] >= LEARNED_OBJECTS_KEPT, kept
    # With room for fewer patches than objects (3 of 36), FastV, which ranks by the question's attention, keeps the
    # object asked about more often than the image predictor, which cannot know the question.
    tight = {
        selector: patches_kept(model, processor, fixed_questions, selector, 0.1, batch_size=48)["subjects"]
        for selector in ("learned", "fastv")
    }
    assert tight["fastv"] > tight["learned"], tight


def test_output_gating_keeps_about_half_and_the_descriptions(demo):
    """Stage 2 trained the output-text predictor towards keeping half of the generated tokens, and `train-demo`
    calibrated its threshold to that rate; gating then leaves the descriptions as they were."""
    model, processor = demo
    descriptions = make_samples(DESCRIPTIONS, FIXTURE_SEED, LONG_KINDS)
    gated = description_quality(model, processor, descriptions, gate_outputs=True, batch_size=1)
    dense = description_quality(model, processor, descriptions, gate_outputs=False, batch_size=1)
    assert OUTPUT_KEEP_RANGE[0] <= gated["output_keep_rate"] <= OUTPUT_KEEP_RANGE[1], gated
    assert gated["token_f1"] >= dense["token_f1"] - MAX_F1_DROP_WITH_GATING, (gated, dense)
    assert gated["generated_kv_ratio"] <= MAX_GENERATED_KV_RATIO, gated
    assert dense["output_keep_rate"] == 1.0


def test_every_short_answer_fits_the_generation_budget(demo):
    _, processor = demo
    samples = make_samples(700, FIXTURE_SEED + 1, SHORT_KINDS)
    longest = max(len(processor.tokenizer(" " + s["answer"], add_special_tokens=False).input_ids) for s in samples)
    assert longest + 1 <= SHORT_ANSWER_TOKENS  # and </s>


def test_pipeline_gives_the_models_answers(demo, demo_folder, fixed_questions):
    model, processor = demo
    samples = fixed_questions[:6]
    expected, _ = generate_answers(model, processor, samples, None, max_new_tokens=SHORT_ANSWER_TOKENS)
    pipe = pipeline("image-text-to-text", model=str(demo_folder))
    chats = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]}],
            }
        ]
        for s in samples
    ]
    outputs = pipe(text=chats, batch_size=3, max_new_tokens=SHORT_ANSWER_TOKENS, return_full_text=False)
    answers = [output[0]["generated_text"].strip() for output in outputs]
    assert answers == expected and all(answers)


@pytest.mark.slow
def test_remote_code_in_a_fresh_venv_answers_like_the_package(demo_folder, fixed_questions, tmp_path):
    """Where dynamic_llava_hf is not installed, the assembled folder loads with trust_remote_code=True and gives the
    installed package's answers (model, Auto classes, pipeline)."""
    samples = fixed_questions[:4]
    image_paths = []
    for index, sample in enumerate(samples):
        image_paths.append(str(tmp_path / f"image{index}.png"))
        sample["image"].save(image_paths[-1])
    request = tmp_path / "request.json"
    questions = [s["question"] for s in samples]
    request.write_text(
        json.dumps(
            {
                "folder": str(demo_folder),
                "images": image_paths,
                "questions": questions,
                "max_new_tokens": SHORT_ANSWER_TOKENS,
            }
        )
    )
    remote = run_probe_without_package(request, tmp_path)
    assert remote["model_class"].startswith("transformers_modules.")

    # The installed package on the same inputs: same tokens from generate() and the same pipeline answers.
    model = AutoModelForImageTextToText.from_pretrained(demo_folder).eval()
    local = model.generate(**remote["inputs"], max_new_tokens=SHORT_ANSWER_TOKENS, do_sample=False)
    assert torch.equal(local, remote["sequences"])
    processor = AutoProcessor.from_pretrained(demo_folder)
    expected, _ = generate_answers(model, processor, samples, None, max_new_tokens=SHORT_ANSWER_TOKENS)
    assert [answer.strip() for answer in remote["pipeline_answers"]] == expected
