"""The shipped demo model: a complete folder from the installed package, the Auto classes, the pipeline, remote code,
and held-out accuracy floors (full context and 20% of the image tokens)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_remote_code import PROBE, create_venv_without_package
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

import dynamic_llava_hf
from dynamic_llava_hf import DynamicLlavaForConditionalGeneration, demo_model_path
from dynamic_llava_hf.demo_model import DEMO_PACKAGE_DATA, REMOTE_CODE_FILES
from dynamic_llava_hf.evaluate import short_answer_accuracy
from dynamic_llava_hf.synthetic import SHORT_KINDS, make_samples


FIXTURE_SEED = 777  # neither a training seed (1, 2) nor the eval seed
QUESTIONS_PER_KIND = 8  # 48 questions
# Floors of the fixed question set (the full eval, on 600 questions, is in the README).
FULL_CONTEXT_FLOOR = 0.95
MAX_DROP_AT_KEEP_02 = 0.03  # learned selector at vision keep 0.2: at most one of the 48 questions lost
RANDOM_GAP = 0.15  # the random selector is at least this far below the learned one


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


def test_accuracy_floors_full_context_and_keep_02(demo, fixed_questions):
    model, processor = demo
    full = short_answer_accuracy(model, processor, fixed_questions, "learned", 1.0, batch_size=48)
    learned = short_answer_accuracy(model, processor, fixed_questions, "learned", 0.2, batch_size=48)
    random = short_answer_accuracy(model, processor, fixed_questions, "random", 0.2, batch_size=48)
    assert full["overall"] >= FULL_CONTEXT_FLOOR, full
    assert learned["overall"] >= full["overall"] - MAX_DROP_AT_KEEP_02, (learned, full)
    assert random["overall"] <= learned["overall"] - RANDOM_GAP, (random, learned)


def test_pipeline_answers_questions_about_pictures(demo_folder, fixed_questions):
    pipe = pipeline("image-text-to-text", model=str(demo_folder))
    samples = fixed_questions[:6]
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": s["image"]}, {"type": "text", "text": s["question"]}]}]
        for s in samples
    ]
    outputs = pipe(text=chats, batch_size=3, max_new_tokens=6, return_full_text=False)
    answers = [output[0]["generated_text"].strip() for output in outputs]
    assert sum(answer == s["answer"] for answer, s in zip(answers, samples)) >= 5, answers


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
        json.dumps({"folder": str(demo_folder), "images": image_paths, "questions": questions, "max_new_tokens": 6})
    )
    python = create_venv_without_package(tmp_path / "venv")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    result = subprocess.run(
        [str(python), "-I", str(PROBE), str(request), str(tmp_path / "remote.pt")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    remote = torch.load(tmp_path / "remote.pt", weights_only=False)
    assert remote["model_class"].startswith("transformers_modules.")
    answers = [answer.strip() for answer in remote["pipeline_answers"]]
    assert sum(answer == s["answer"] for answer, s in zip(answers, samples)) >= 3, answers

    model = AutoModelForImageTextToText.from_pretrained(demo_folder).eval()
    inputs = {key: value for key, value in remote["inputs"].items()}
    local = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(local, remote["sequences"])
