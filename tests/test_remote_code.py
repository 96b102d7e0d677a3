"""A saved folder is self-contained: it loads with `trust_remote_code=True` where dynamic_llava_hf is not installed and
behaves exactly like the installed package."""

import importlib.metadata
import json
import os
import site
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import pytest
import torch
from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from tiny_checkpoint import chat, save_tiny_checkpoint, tiny_images
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module, get_relative_import_files

import dynamic_llava_hf
from dynamic_llava_hf import DynamicLlavaCache, DynamicLlavaForConditionalGeneration
from dynamic_llava_hf.pretrained_dynamic_llava import REMOTE_CODE_FILES
from tolerances import FP32_SAME_MATH


PROBE = Path(__file__).parent / "remote_code_probe.py"
QUESTIONS = ["w1 w2 w3", "w7 w8 w9 w10 w11 w12 w13"]  # different lengths: a left-padded batch
MAX_NEW_TOKENS = 6


def package_site_entries() -> set[str]:
    """Top-level names the dynamic-llava-hf distribution installed into site-packages: its code (or, for an editable
    install, the .pth file / import finder pointing at src/) and its dist-info."""
    try:
        files = importlib.metadata.distribution("dynamic-llava-hf").files or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {PurePosixPath(str(file)).parts[0] for file in files if not str(file).startswith("..")}


def create_venv_without_package(venv_dir: Path) -> Path:
    """A virtual environment with every package of this one except dynamic-llava-hf; returns its python.

    Its site-packages holds symlinks to the entries of this environment's site-packages, minus what the
    dynamic-llava-hf distribution installed there. Nothing is downloaded, and the package is absent the way it would
    be had it never been installed, whether it was installed editable or not.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)], check=True)
    python = venv_dir / "bin" / "python"
    venv_site = Path(
        subprocess.run(
            [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    excluded = package_site_entries() | {"__pycache__"}
    site_dirs = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    for site_dir in dict.fromkeys(site_dirs):
        if not os.path.isdir(site_dir):
            continue
        for entry in os.listdir(site_dir):
            link = venv_site / entry
            if entry not in excluded and not link.exists():
                link.symlink_to(Path(site_dir) / entry)
    return python


def process_like_a_user(processor, images):
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for question in QUESTIONS
    ]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


def run_probe_without_package(request: Path, tmp_path: Path) -> dict:
    """Runs remote_code_probe.py on `request` in a fresh venv without dynamic_llava_hf; returns what it observed.
    Its remote-code module cache is `tmp_path / "hf_modules"` (a fresh copy, not a cached one)."""
    python = create_venv_without_package(tmp_path / "venv")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    result = subprocess.run(
        [str(python), "-I", str(PROBE), str(request), str(tmp_path / "remote.pt")],
        check=False,  # the assertion below shows the probe's output
        cwd=tmp_path,  # neither the repository nor src/ is on the path
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return torch.load(tmp_path / "remote.pt", weights_only=False)


def greedy(model, inputs):
    return model.generate(
        **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True
    )


@pytest.mark.slow
def test_fresh_venv_loads_the_folder_with_trust_remote_code_and_generates_identically(tmp_path):
    folder = tmp_path / "checkpoint"
    save_tiny_checkpoint(folder)
    image_paths = []
    for index, image in enumerate(tiny_images(len(QUESTIONS))):
        image_paths.append(str(tmp_path / f"image{index}.png"))
        image.save(image_paths[-1])
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {"folder": str(folder), "images": image_paths, "questions": QUESTIONS, "max_new_tokens": MAX_NEW_TOKENS}
        )
    )

    remote = run_probe_without_package(request, tmp_path)

    # The venv really lacked the package and ran the folder's code.
    assert "dynamic_llava_hf" in remote["import_error"]
    assert str(Path(dynamic_llava_hf.__file__).parents[1]) not in remote["sys_path"], remote["sys_path"]
    assert remote["untrusted_error"] is not None and "trust_remote_code" in remote["untrusted_error"]
    assert remote["config_class"].startswith("transformers_modules.")
    assert remote["config_class"].endswith("configuration_dynamic_llava.DynamicLlavaConfig")
    assert remote["model_class"].endswith("modeling_dynamic_llava.DynamicLlavaForConditionalGeneration")
    assert remote["base_model_class"].endswith("modeling_dynamic_llava.DynamicLlavaModel")
    assert remote["cache_class"].startswith("transformers_modules.")
    assert remote["cache_class"].endswith("cache_dynamic_llava.DynamicLlavaCache")
    assert (tmp_path / "hf_modules" / "transformers_modules" / "checkpoint").is_dir()

    # The installed package, on the same folder and images, without trust_remote_code.
    processor = AutoProcessor.from_pretrained(folder)
    inputs = process_like_a_user(processor, tiny_images(len(QUESTIONS)))
    for key, value in inputs.items():
        assert torch.equal(remote["inputs"][key], value), key
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model) is DynamicLlavaForConditionalGeneration
    local = greedy(model, inputs)
    with torch.no_grad():
        prefill = model(**inputs)
        base_hidden = AutoModel.from_pretrained(folder).eval()(**inputs).last_hidden_state

    assert torch.equal(remote["sequences"], local.sequences)
    torch.testing.assert_close(remote["scores"], torch.stack(local.scores), atol=FP32_SAME_MATH, rtol=0)
    torch.testing.assert_close(remote["prefill_logits"], prefill.logits, atol=FP32_SAME_MATH, rtol=0)
    torch.testing.assert_close(remote["base_hidden"], base_hidden, atol=FP32_SAME_MATH, rtol=0)
    assert torch.equal(remote["stored_lengths"], local.get(CACHE_NAME).stored_lengths())
    assert remote["sparsity_report"] == local.get(CACHE_NAME).sparsity_report()
    # Sparsification really ran: 4 of 9 image tokens kept per image (vision_keep_rate 0.5).
    for kept_remote, kept_local in zip(remote["kept_image_token_indices"], prefill.kept_image_token_indices):
        assert torch.equal(kept_remote, kept_local) and len(kept_local) == 4

    # The pipeline too: remote code there, the installed package here, same answers.
    assert remote["pipeline_model_class"] == remote["model_class"]
    pipe = pipeline("image-text-to-text", model=str(folder))
    chats = [chat(question, image) for question, image in zip(QUESTIONS, tiny_images(len(QUESTIONS)))]
    answers = pipe(text=chats, batch_size=2, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert remote["pipeline_answers"] == [answer[0]["generated_text"] for answer in answers]


def test_saved_folder_carries_the_remote_code_and_a_full_auto_map(tmp_path):
    save_tiny_checkpoint(tmp_path)
    for name in REMOTE_CODE_FILES:
        assert (tmp_path / name).read_text() == (Path(dynamic_llava_hf.__file__).parent / name).read_text()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_dynamic_llava.DynamicLlavaConfig",
        "AutoModel": "modeling_dynamic_llava.DynamicLlavaModel",
        "AutoModelForImageTextToText": "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration",
    }


def test_remote_code_files_are_the_modeling_file_and_everything_it_imports():
    package = Path(dynamic_llava_hf.__file__).parent
    imported = {Path(path).name for path in get_relative_import_files(package / "modeling_dynamic_llava.py")}
    assert set(REMOTE_CODE_FILES) == imported | {"modeling_dynamic_llava.py"}
    # Flat and self-contained: torch, transformers and each other only.
    for name in REMOTE_CODE_FILES:
        for line in (package / name).read_text().splitlines():
            if line.startswith(("import ", "from ")) and not line.startswith("from ."):
                assert line.split()[1].split(".")[0] in {"dataclasses", "torch", "transformers"}, (name, line)


def test_remote_module_in_this_process_matches_the_installed_package(tmp_path):
    model, processor = save_tiny_checkpoint(tmp_path)
    inputs = process_like_a_user(processor, tiny_images(len(QUESTIONS)))
    expected = greedy(model, inputs)

    # With the package installed, its explicitly registered classes win even with trust_remote_code=True.
    trusted = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(trusted) is DynamicLlavaForConditionalGeneration
    assert type(AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)).__module__.startswith("dynamic_llava_hf")

    # The folder's own copy of the code, imported from transformers' module cache, behaves identically.
    remote_class = get_class_from_dynamic_module(
        "modeling_dynamic_llava.DynamicLlavaForConditionalGeneration", str(tmp_path)
    )
    assert remote_class.__module__.startswith("transformers_modules.")
    remote = remote_class.from_pretrained(tmp_path).eval()
    for loaded in (trusted, remote):
        out = greedy(loaded, inputs)
        assert torch.equal(out.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), atol=FP32_SAME_MATH, rtol=0)
    remote_cache = greedy(remote, inputs).get(CACHE_NAME)
    assert type(remote_cache).__module__.startswith("transformers_modules.") and type(remote_cache) is not (
        DynamicLlavaCache
    )
    assert torch.equal(remote_cache.stored_lengths(), expected.get(CACHE_NAME).stored_lengths())


# ---------------------------------------------------------------------------------------------------------------------
# Which code runs (issue #13, items 3 and 4; README "Which code runs")

WHICH_CODE_RUNS = r"""
import json, sys
folder, import_package, trust = json.loads(sys.argv[1])
if import_package:
    import dynamic_llava_hf
from transformers import AutoModelForImageTextToText, AutoProcessor
result = {}
try:
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    result["model"] = type(AutoModelForImageTextToText.from_pretrained(folder, **kwargs)).__module__
except ValueError as error:
    result["model"] = "ValueError: " + str(error)
result["processor"] = type(AutoProcessor.from_pretrained(folder, trust_remote_code=False)).__name__
if import_package:  # registered classes: no question about the folder's code, even with the argument unset
    result["processor"] += "+" + type(AutoProcessor.from_pretrained(folder)).__name__
result["folder_code_ran"] = "folder_code_ran" in sys.modules
print("RESULT " + json.dumps(result))
"""


def which_code_runs(folder: Path, import_package: bool, trust) -> tuple[dict, str]:
    completed = subprocess.run(
        [sys.executable, "-c", WHICH_CODE_RUNS, json.dumps([str(folder), import_package, trust])],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,  # an interactive "run the custom code?" prompt would fail instead of waiting
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    # An interactive prompt (answered by the closed stdin) leaves no newline: the result may follow it on its line.
    lines = [line.split("RESULT ", 1)[1] for line in completed.stdout.splitlines() if "RESULT " in line]
    assert completed.returncode == 0 and lines, (completed.stdout[-2000:], completed.stderr[-2000:])
    return json.loads(lines[-1]), completed.stdout + completed.stderr


def test_which_code_runs_installed_imported_or_not(tmp_path):
    save_tiny_checkpoint(tmp_path)
    with open(tmp_path / "modeling_dynamic_llava.py", "a", encoding="utf-8") as handle:
        handle.write('\nimport sys\nsys.modules["folder_code_ran"] = sys\n')  # a marker: this copy was executed

    # Four fresh interpreters that share nothing but the folder (only the first writes transformers' module cache):
    # run at once, they take the time of one or two.
    scenarios = {"folder, trusted": (False, True), "folder, untrusted": (False, False)}
    scenarios |= {f"imported, trust {trust}": (True, trust) for trust in (True, None)}
    with ThreadPoolExecutor(len(scenarios)) as pool:
        runs = dict(zip(scenarios, pool.map(lambda args: which_code_runs(tmp_path, *args), scenarios.values())))

    # Installed but not imported: trust_remote_code=True runs the folder's code, not the installed package.
    result, _ = runs["folder, trusted"]
    assert result["model"].startswith("transformers_modules.") and result["folder_code_ran"]
    # ... and without trust_remote_code it does not load (None would first ask interactively).
    result, output = runs["folder, untrusted"]
    assert "trust_remote_code=True" in result["model"] and not result["folder_code_ran"]
    # The processor is transformers' LlavaProcessor: with trust_remote_code=False no prompt and no custom code.
    assert result["processor"] == "LlavaProcessor" and "Do you wish to run the custom code" not in output
    # Imported first: the installed classes, whatever trust_remote_code says; the folder's code never runs.
    for trust in (True, None):
        result, output = runs[f"imported, trust {trust}"]
        assert result["model"] == "dynamic_llava_hf.modeling_dynamic_llava" and not result["folder_code_ran"]
        assert result["processor"] == "LlavaProcessor+LlavaProcessor"
        assert "Do you wish to run the custom code" not in output
