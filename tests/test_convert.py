"""`dynamic-llava convert`: official and llava-hf sources, remote-code loading, processor files, safety rules."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jinja2
import jinja2.meta
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_models import tiny_text_config, tiny_vision_config
from tiny_processor import tiny_tokenizer
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from dynamic_llava_hf import (
    VICUNA_V1_CHAT_TEMPLATE,
    CheckpointError,
    DynamicLlavaConfig,
    add_llava_special_tokens,
    convert_llava_hf_checkpoint,
    convert_original_checkpoint,
)
from dynamic_llava_hf.cli import main
from dynamic_llava_hf.convert import model_card_template, verify_saved_weights, writer
from dynamic_llava_hf.pretrained_dynamic_llava import REMOTE_CODE_FILES
from dynamic_llava_hf.reference_check import REFERENCE_SCENARIOS
from tolerances import CONVERTED_LOGITS, FP32_SAME_MATH


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Predictors sized for the tiny llava-hf model (the defaults are the 7B ones).
TINY_PREDICTORS = {"predictor_d_model": 16, "predictor_num_heads": 2, "predictor_ffn_dim": 32}


def read_text(path) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def read_json(path) -> dict:
    return json.loads(read_text(path))


def leftovers(folder) -> list[str]:
    """Temporary folders a conversion may have left next to its destination."""
    return [name for name in os.listdir(folder) if ".converting-" in name or ".replaced-" in name]


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoint -> remote code -> the official implementation's outputs

# Runs where `dynamic_llava_hf` is never imported, so the Auto classes can only use the remote code in the folders.
REMOTE_CODE_CHECK = r"""
import json, sys
import torch
from transformers import AutoModelForImageTextToText

torch.set_num_threads(1)  # tiny matrices: extra threads only contend with the other test processes
folders, reference_path, scenarios = json.loads(sys.argv[1])
reference = torch.load(reference_path, weights_only=True)
models = {
    key: AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True) for key, path in folders.items()
}
results = {"modules": {key: type(model).__module__ for key, model in models.items()}, "rows": []}
for scenario, (sparsity, instruct) in scenarios.items():
    model = models["instruct" if instruct else "default"]
    config = model.config
    for sample in reference["samples"]:
        ids = sample["input_ids"][0]
        position = (ids == -200).nonzero().item()
        image = torch.full((config.image_seq_length,), config.image_token_id)
        input_ids = torch.cat([ids[:position], image, ids[position + 1 :]])[None]
        expected = sample["results"][scenario]["generate_cache"]
        out = model.generate(
            input_ids=input_ids, pixel_values=sample["pixel_values"], sparsity=sparsity,
            max_new_tokens=len(expected["new_tokens"]), do_sample=False, eos_token_id=None, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
        logits = torch.stack(out.logits)[:, 0, : expected["step_logits"].shape[-1]]
        results["rows"].append({
            "scenario": scenario,
            "tokens_match": torch.equal(out.sequences[0, input_ids.shape[1] :], expected["new_tokens"]),
            "kv_lengths_match": out.past_key_values.stored_lengths()[:, 0].tolist() == expected["kv_len_per_layer"],
            "max_logit_diff": float((logits - expected["step_logits"]).abs().max()),
        })
results["package_imported"] = "dynamic_llava_hf" in sys.modules
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def converted_reference(reference_dir, tmp_path_factory):
    """The reference checkpoint converted with the CLI, as is and with the instruct predictor built."""
    root = tmp_path_factory.mktemp("converted_reference")
    checkpoint = os.path.join(reference_dir, "checkpoint")
    folders = {"default": str(root / "default"), "instruct": str(root / "instruct")}
    assert main(["convert", "original", checkpoint, folders["default"], "--no-progress"]) == 0
    assert (
        main(["convert", "original", checkpoint, folders["instruct"], "--use-instruct-predictor", "--no-progress"])
        == 0
    )
    return folders


def test_cli_conversion_reproduces_the_reference_through_remote_code(converted_reference, reference_dir, tmp_path):
    scenarios = {
        name: (sparsity, bool(overrides.get("use_instruct_predictor")))
        for name, (sparsity, overrides) in REFERENCE_SCENARIOS.items()
    }
    argument = json.dumps([converted_reference, os.path.join(reference_dir, "reference.pt"), scenarios])
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_CHECK, argument],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert not results["package_imported"]
    assert all(module.startswith("transformers_modules") for module in results["modules"].values()), results
    assert len(results["rows"]) == 16
    for row in results["rows"]:
        assert row["tokens_match"] and row["kv_lengths_match"], row
        assert row["max_logit_diff"] <= CONVERTED_LOGITS, row


def test_converted_reference_folder(converted_reference):
    folder = converted_reference["default"]
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= set(os.listdir(folder))
    assert set(REMOTE_CODE_FILES) <= set(os.listdir(folder))
    config = read_json(os.path.join(folder, "config.json"))
    assert config["model_type"] == "dynamic_llava" and config["image_token_index"] == 512
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    generation = read_json(os.path.join(folder, "generation_config.json"))
    assert generation["suppress_tokens"] == [512] and generation["eos_token_id"] == 2
    assert not leftovers(os.path.dirname(folder))

    card = read_text(os.path.join(folder, "README.md"))
    assert "{{" not in card and "}}" not in card
    front_matter = card.split("---\n")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-text-to-text", "license: other", "- custom_code"):
        assert line in front_matter
    assert "dynamic-llava convert original" in card and "| `vision_keep_rate` | 0.2 | 5 of 25" in card
    assert "no processor files" in card  # the reference has no tokenizer


def test_model_card_template_ships_with_the_package():
    """The converter reads the template from the package (works from a wheel); it must equal the repository's."""
    with open(os.path.join(REPO_ROOT, "MODEL_CARD.md"), encoding="utf-8") as handle:
        assert model_card_template() == handle.read()


def test_model_card_gives_every_template_field_a_value(monkeypatch):
    """Jinja renders a field without a value as nothing, so the card must pass every field the template uses."""
    values = {}
    monkeypatch.setattr(
        writer.ModelCard, "from_template", lambda card_data, template_str, **kwargs: values.update(kwargs)
    )
    writer.model_card(DynamicLlavaConfig(), "out", "a source", "a command", None, None, None, True, False)
    fields = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(model_card_template()))
    assert fields == set(values) | {"card_data"}  # card_data: the YAML metadata, filled in by huggingface_hub


# ---------------------------------------------------------------------------------------------------------------------
# Official checkpoint with a tokenizer: <image>/<pad> added like llava-hf, processor files written


@pytest.fixture(scope="module")
def original_with_tokenizer(reference_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("original_with_tokenizer")
    source = root / "source"
    shutil.copytree(os.path.join(reference_dir, "checkpoint"), source)
    os.chmod(source, 0o755)
    tiny_tokenizer(vocab_size=512).save_pretrained(source)
    result = convert_original_checkpoint(str(source), str(root / "converted"), progress=False, base_model="org/base")
    return source, result


def test_tokenizer_source_gets_llava_hf_tokens_and_a_processor(original_with_tokenizer, reference_dir):
    source, result = original_with_tokenizer
    assert result.processor_written and result.special_tokens.added_tokens == ("<image>", "<pad>")
    assert (result.special_tokens.image_token_id, result.special_tokens.pad_token_id) == (512, 513)

    model = AutoModelForImageTextToText.from_pretrained(result.dst)
    config = model.config
    assert (config.image_token_id, config.text_config.vocab_size, config.text_config.pad_token_id) == (512, 576, 513)
    original = load_file(os.path.join(source, "model.safetensors"))
    embeddings = model.get_input_embeddings().weight
    assert torch.equal(embeddings[:512], original["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight[:512], original["lm_head.weight"])
    assert set(model.generation_config.suppress_tokens) == set(range(512, 576))
    assert model.generation_config.pad_token_id == 513

    processor = AutoProcessor.from_pretrained(result.dst)
    assert isinstance(processor, LlavaProcessor) and processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert processor.tokenizer.padding_side == "left" and processor.image_processor.do_pad

    # The processor's prompt for the reference's first sample generates what the official code generated.
    sample = torch.load(os.path.join(reference_dir, "reference.pt"), weights_only=True)["samples"][0]
    ids = sample["input_ids"][0]
    words = ["<image>" if token == -200 else processor.tokenizer.convert_ids_to_tokens(int(token)) for token in ids]
    assert words[0] == "<s>"
    inputs = processor(text=" ".join(words[1:]), images=[torch.zeros(3, 70, 70)], return_tensors="pt")
    assert (inputs["input_ids"] == 512).sum() == 25
    expected = sample["results"]["sparse_on"]["generate_cache"]["new_tokens"]
    out = model.generate(
        input_ids=inputs["input_ids"],
        pixel_values=sample["pixel_values"],
        max_new_tokens=len(expected),
        do_sample=False,
        eos_token_id=None,
    )
    assert torch.equal(out[0, inputs["input_ids"].shape[1] :], expected)


@torch.no_grad()
def test_converted_official_checkpoint_takes_inputs_embeds(original_with_tokenizer, reference_dir):
    """The new vocabulary rows differ, so `<pad>` under a padded batch's inputs_embeds is no image token."""
    _, result = original_with_tokenizer
    model = AutoModelForImageTextToText.from_pretrained(result.dst)
    embeddings = model.get_input_embeddings().weight
    assert len({tuple(row) for row in embeddings[512:].tolist()}) == 576 - 512
    sample = torch.load(os.path.join(reference_dir, "reference.pt"), weights_only=True)["samples"][0]
    # The official prompt has one -200 per image; the converted model takes the image's 25 `<image>` tokens.
    ids = torch.cat([torch.full((25,), 512) if token == -200 else token[None] for token in sample["input_ids"][0]])
    input_ids = torch.stack([ids, torch.cat([torch.full((3,), 513), ids[:-3]])])  # second row: left-padded
    attention_mask = (input_ids != 513).long()
    pixel_values = sample["pixel_values"].expand(2, -1, -1, -1)
    by_ids = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    by_embeds = model(
        inputs_embeds=model.get_input_embeddings()(input_ids), attention_mask=attention_mask, pixel_values=pixel_values
    )
    torch.testing.assert_close(by_embeds.logits, by_ids.logits)
    assert [kept.tolist() for kept in by_embeds.kept_image_token_indices] == [
        kept.tolist() for kept in by_ids.kept_image_token_indices
    ]


def test_model_card_code_runs_as_written(original_with_tokenizer, capsys):
    _, result = original_with_tokenizer
    card = read_text(os.path.join(result.dst, "README.md"))
    assert "base_model: org/base" in card and "no processor files" not in card
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "MODEL_CARD.md", "exec"), {})  # noqa: S102 - the card's own example code
    printed = capsys.readouterr().out
    assert "image_tokens_kept" in printed  # the sparsity report


# ---------------------------------------------------------------------------------------------------------------------
# llava-hf checkpoints (legacy and current key layouts)

LLAVA_IMAGE_TOKEN = 64  # the tiny tokenizer's <image> after add_llava_special_tokens


def legacy_key(key: str) -> str:
    """transformers < 4.52 names (llava-hf/llava-1.5-7b-hf): `language_model.model.*`, `vision_tower.vision_model.*`"""
    for current, legacy in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(current):
            return legacy + key[len(current) :]
    raise AssertionError(key)


@pytest.fixture(scope="module")
def llava_hf_sources(tmp_path_factory):
    """A tiny transformers Llava with random weights and a tokenizer, saved in both key layouts."""
    root = tmp_path_factory.mktemp("llava_hf")
    torch.manual_seed(0)
    config = LlavaConfig(
        text_config=LlamaConfig(**tiny_text_config(vocab_size=128, pad_token_id=LLAVA_IMAGE_TOKEN + 1)),
        vision_config=CLIPVisionConfig(**tiny_vision_config()),
        image_token_index=LLAVA_IMAGE_TOKEN,
        image_seq_length=9,
    )
    model = LlavaForConditionalGeneration(config).eval()
    tokenizer = tiny_tokenizer()
    assert add_llava_special_tokens(tokenizer).image_token_id == LLAVA_IMAGE_TOKEN
    current, legacy = root / "current", root / "legacy"
    model.save_pretrained(current, save_original_format=False)
    tokenizer.save_pretrained(current)
    shutil.copytree(current, legacy)
    os.remove(legacy / "model.safetensors")
    state_dict = {legacy_key(key): tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state_dict, legacy / "model.safetensors", metadata={"format": "pt"})
    return model, {"current": str(current), "legacy": str(legacy)}


def llava_inputs():
    """Two left-padded rows with one image each (9 image tokens), for comparing logits."""
    generator = torch.Generator().manual_seed(1)
    rows = [[1, 7, 8] + [LLAVA_IMAGE_TOKEN] * 9 + [9, 10, 11], [1] + [LLAVA_IMAGE_TOKEN] * 9 + [12]]
    rows = [torch.tensor(row) for row in rows]
    pad_token = LLAVA_IMAGE_TOKEN + 1  # <pad> comes right after <image>, as in llava-hf
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_token, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(row) for row in rows], batch_first=True, padding_side="left")
    return input_ids, attention_mask, torch.randn(2, 3, 42, 42, generator=generator)


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_llava_hf_checkpoint_converts_with_only_predictors_new(llava_hf_sources, layout, tmp_path):
    source_model, sources = llava_hf_sources
    dst = tmp_path / "converted"
    result = convert_llava_hf_checkpoint(sources[layout], str(dst), progress=False, **TINY_PREDICTORS)
    assert result.new_keys and all(
        key.startswith(("model.image_score_predictor.", "model.output_text_score_predictor."))
        for key in result.new_keys
    )

    model, info = AutoModelForImageTextToText.from_pretrained(dst, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    converted = model.state_dict()
    source = source_model.state_dict()
    assert set(converted) - set(source) == set(result.new_keys)
    assert all(torch.equal(converted[key], tensor) for key, tensor in source.items())

    input_ids, attention_mask, pixel_values = llava_inputs()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    with torch.no_grad():
        expected = source_model(**inputs).logits
        dense = model(**inputs, sparsity=False)
        default = model(**inputs)
        sparse = model(**inputs, sparsity=True)
    valid = attention_mask.bool()
    # Untrained predictors are not used unless asked for: by default the model is the source Llava.
    assert read_json(dst / "config.json")["predictors_trained"] is False
    for out in (dense, default):
        assert (out.logits[valid] - expected[valid]).abs().max() <= FP32_SAME_MATH
        assert out.kept_image_token_indices is None and out.output_keep_decisions is None
    # Asked for, the fresh predictors prune: floor(9 * vision_keep_rate) image tokens kept per image.
    kept = int(9 * model.config.vision_keep_rate)
    assert [len(indices) for indices in sparse.kept_image_token_indices] == [kept, kept]
    card = read_text(dst / "README.md")
    assert '"predictors_trained": false' in card and "sparsity=True" in card

    processor = AutoProcessor.from_pretrained(dst)
    assert isinstance(processor, LlavaProcessor) and processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert processor.image_processor.do_pad and processor.image_processor.crop_size["height"] == 42


def test_llava_hf_sparse_settings_come_from_the_command_line(llava_hf_sources, tmp_path):
    _, sources = llava_hf_sources
    dst = tmp_path / "converted"
    argv = ["convert", "llava-hf", sources["current"], str(dst), "--no-progress", "--vision-keep-rate", "0.5"]
    argv += ["--no-use-output-text-predictor", "--predictor-d-model", "16", "--predictor-num-heads", "2"]
    argv += ["--predictor-ffn-dim", "32", "--dtype", "bfloat16", "--processor", "source"]
    assert main(argv) == 0
    config = read_json(dst / "config.json")
    assert config["vision_keep_rate"] == 0.5 and not config["use_output_text_predictor"]
    assert config["dtype"] == "bfloat16"
    assert all(tensor.dtype == torch.bfloat16 for tensor in load_file(dst / "model.safetensors").values())
    assert not any(key.startswith("model.output_text_score_predictor") for key in load_file(dst / "model.safetensors"))
    # --processor source copies the source's processor as it is (here: the tokenizer only).
    assert os.path.isfile(dst / "tokenizer.json") and not os.path.isfile(dst / "processor_config.json")


# ---------------------------------------------------------------------------------------------------------------------
# Safety: no overwrite without --force, atomic replacement, corrupted sources, pickles


@pytest.fixture
def reference_copy(reference_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(os.path.join(reference_dir, "checkpoint"), source)
    for folder in (source, source / "vision_tower"):
        os.chmod(folder, 0o755)
        for name in os.listdir(folder):
            os.chmod(folder / name, 0o755 if os.path.isdir(folder / name) else 0o644)
    return source


def progress_bars(stderr: str) -> list[str]:
    """The descriptions of the tqdm bars in `stderr`, each once, in order."""
    descriptions = [line.split(":")[0].strip() for line in re.split(r"[\r\n]", stderr) if "%|" in line]
    return list(dict.fromkeys(descriptions))


def test_progress_bars_one_per_step_and_the_global_switch(reference_copy, tmp_path, capsys):
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    try:
        transformers.utils.logging.enable_progress_bar()
        convert_original_checkpoint(str(reference_copy), str(tmp_path / "shown"))
        assert progress_bars(capsys.readouterr().err) == ["Reading", "Writing model shards", "Verifying"]

        transformers.utils.logging.disable_progress_bar()  # also huggingface_hub's switch
        convert_original_checkpoint(str(reference_copy), str(tmp_path / "hidden"))
        assert progress_bars(capsys.readouterr().err) == []
    finally:  # as it was
        if enabled:
            transformers.utils.logging.enable_progress_bar()
        else:
            transformers.utils.logging.disable_progress_bar()


def existing_destination(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("do not touch")
    return dst


def test_existing_destination_needs_force(reference_copy, tmp_path, capsys):
    dst = existing_destination(tmp_path)
    assert main(["convert", "original", str(reference_copy), str(dst), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert str(dst) in error and "--force" in error
    assert os.listdir(dst) == ["keep.txt"] and not leftovers(tmp_path)

    assert main(["convert", "original", str(reference_copy), str(dst), "--no-progress", "--force"]) == 0
    assert not os.path.exists(dst / "keep.txt") and os.path.isfile(dst / "model.safetensors")
    assert not leftovers(tmp_path)


def test_destination_inside_the_source_is_refused(reference_copy):
    with pytest.raises(ValueError, match="outside the source"):
        convert_original_checkpoint(str(reference_copy), str(reference_copy / "converted"), progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_source_fails_clearly_and_leaves_the_destination(reference_copy, tmp_path, damage):
    weights = reference_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    dst = existing_destination(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        convert_original_checkpoint(str(reference_copy), str(dst), force=True, progress=False)
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "do not touch"
    assert not leftovers(tmp_path)


def test_missing_shard_is_named(reference_copy, tmp_path):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (reference_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        convert_original_checkpoint(str(reference_copy), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_pickle_source_is_refused_unless_allowed(llava_hf_sources, tmp_path):
    source_model, sources = llava_hf_sources
    source = tmp_path / "pickled"
    shutil.copytree(sources["current"], source)
    os.remove(source / "model.safetensors")
    torch.save(source_model.state_dict(), source / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert_llava_hf_checkpoint(str(source), str(tmp_path / "out"), progress=False, **TINY_PREDICTORS)
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)

    with pytest.warns(UserWarning, match="UNPICKLING"):
        result = convert_llava_hf_checkpoint(
            str(source), str(tmp_path / "out"), allow_pickle=True, progress=False, **TINY_PREDICTORS
        )
    assert result.num_tensors == len(source_model.state_dict()) + len(result.new_keys)


def test_verification_catches_a_differing_tensor(converted_reference):
    model = AutoModelForImageTextToText.from_pretrained(converted_reference["default"])
    verify_saved_weights(model, converted_reference["default"])
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias[0] += 1
    with pytest.raises(RuntimeError, match="multi_modal_projector.linear_1.bias differs"):
        verify_saved_weights(model, converted_reference["default"])


def test_wrong_source_kind_is_named(reference_dir, tmp_path, capsys):
    checkpoint = os.path.join(reference_dir, "checkpoint")
    assert main(["convert", "llava-hf", checkpoint, str(tmp_path / "out"), "--no-progress"]) == 1
    assert "model_type 'dynamic_llava_llama'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# The official config is checked as it is read (issue #13, items 1 and 5)


def edit_config(folder, edit) -> None:
    path = folder / "config.json"
    config = read_json(path)
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("use_vision_predictor", "false", "sparse_config.use_vision_predictor must be True or False"),
        ("use_text_predictor", "false", "sparse_config.use_text_predictor must be True or False"),
        ("use_output_text_predictor", None, "sparse_config.use_output_text_predictor must be True or False"),
        ("vision_keep_rate", 1.5, r"sparse_config.vision_keep_rate must be a number in \(0, 1\]"),
        ("d_model", "512", "sparse_config.d_model must be a positive int"),
        ("sparse_layer", 0, "sparse_config.sparse_layer must be a positive int"),
    ],
)
def test_official_sparse_config_values_are_checked_under_their_names(
    reference_copy, tmp_path, capsys, key, value, message
):
    edit_config(reference_copy, lambda config: config["sparse_config"].__setitem__(key, value))
    assert main(["convert", "original", str(reference_copy), str(tmp_path / "out"), "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert re.search(message, error) and "\n" not in error
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_converter_never_writes_a_string_boolean(reference_copy, tmp_path):
    with pytest.raises(ValueError, match="use_instruct_predictor must be True or False"):
        convert_original_checkpoint(str(reference_copy), str(tmp_path / "out"), use_instruct_predictor="false")
    assert not os.path.exists(tmp_path / "out")


def test_official_config_without_vocab_size_is_one_line(reference_copy, tmp_path, capsys):
    edit_config(reference_copy, lambda config: config.pop("vocab_size"))
    assert main(["convert", "original", str(reference_copy), str(tmp_path / "out"), "--no-progress"]) == 1
    error = capsys.readouterr().err.strip()
    assert "lacks vocab_size" in error and "\n" not in error


# ---------------------------------------------------------------------------------------------------------------------
# No pruning with untrained predictors by default (issue #13, item 2)


def generate_new_tokens(model, **kwargs):
    input_ids, attention_mask, pixel_values = llava_inputs()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences[:, input_ids.shape[1] :], out.past_key_values


def test_fresh_llava_hf_conversion_generates_like_the_source(llava_hf_sources, tmp_path):
    source_model, sources = llava_hf_sources
    dst = tmp_path / "converted"
    convert_llava_hf_checkpoint(sources["current"], str(dst), progress=False, **TINY_PREDICTORS)
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    kept = [int(9 * model.config.vision_keep_rate)] * 2
    expected, _ = generate_new_tokens(source_model)
    tokens, cache = generate_new_tokens(model)
    assert torch.equal(tokens, expected)
    report = cache.sparsity_report()
    assert all(row["image_tokens_kept"] == row["image_tokens_total"] for row in report)
    assert all(row["generated_tokens_kept"] == row["generated_tokens_total"] for row in report)
    # A training-free selector asked for per call prunes image tokens, and only those.
    _, cache = generate_new_tokens(model, sparsity={"use_vision_predictor": True, "vision_selector": "fastv"})
    assert [row["image_tokens_kept"] for row in cache.sparsity_report()] == kept
    assert all(row["generated_tokens_kept"] == row["generated_tokens_total"] for row in cache.sparsity_report())
    # Switched on for the whole model, the (random) predictors prune.
    model.config.predictors_trained = True
    _, cache = generate_new_tokens(model)
    assert [row["image_tokens_kept"] for row in cache.sparsity_report()] == kept


def test_llava_hf_conversion_can_ask_for_sparsification(llava_hf_sources, tmp_path):
    _, sources = llava_hf_sources
    fastv, trained = tmp_path / "fastv", tmp_path / "trained"
    common = ["--no-progress", "--predictor-d-model", "16", "--predictor-num-heads", "2", "--predictor-ffn-dim", "32"]
    assert main(["convert", "llava-hf", sources["current"], str(fastv), "--vision-selector", "fastv", *common]) == 0
    assert main(["convert", "llava-hf", sources["current"], str(trained), "--predictors-trained", *common]) == 0
    kept = [int(9 * DynamicLlavaConfig().vision_keep_rate)] * 2
    assert read_json(fastv / "config.json")["predictors_trained"] is False
    assert read_json(trained / "config.json")["predictors_trained"] is True
    _, cache = generate_new_tokens(AutoModelForImageTextToText.from_pretrained(fastv).eval())
    report = cache.sparsity_report()
    assert [row["image_tokens_kept"] for row in report] == kept
    assert all(row["generated_tokens_kept"] == row["generated_tokens_total"] for row in report)
    _, cache = generate_new_tokens(AutoModelForImageTextToText.from_pretrained(trained).eval())
    assert [row["image_tokens_kept"] for row in cache.sparsity_report()] == kept


def test_official_conversion_and_the_demo_model_prune_by_default(converted_reference):
    import dynamic_llava_hf

    demo = os.path.join(os.path.dirname(dynamic_llava_hf.__file__), "demo_model_files")
    for folder in (converted_reference["default"], demo):
        assert DynamicLlavaConfig.from_pretrained(folder).predictors_trained is True


def test_model_card_recipe_for_a_source_without_tokenizer(converted_reference, tmp_path):
    folder = tmp_path / "converted"
    shutil.copytree(converted_reference["default"], folder)
    config = DynamicLlavaConfig.from_pretrained(folder)
    tokenizer_folder = tmp_path / "source_tokenizer"
    tiny_tokenizer(vocab_size=config.image_token_id).save_pretrained(tokenizer_folder)  # the source's vocabulary
    card = read_text(folder / "README.md")
    recipe = next(
        block for block in re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL) if "build_processor" in block
    )
    recipe = recipe.replace("path/to/source-tokenizer", str(tokenizer_folder))
    recipe = re.sub(r'folder = ".*"', f'folder = "{folder}"', recipe)
    exec(compile(recipe, "MODEL_CARD.md", "exec"), {})  # noqa: S102 - the card's own example code

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    image_size = config.vision_config.image_size
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.new("RGB", (50, 30), "red"), Image.new("RGB", (20, 90), "blue")]
    inputs = processor(images=images, text=[prompt, prompt + " w3"], padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, image_size, image_size)
    assert int(inputs["input_ids"].max()) < config.text_config.vocab_size
    assert int((inputs["input_ids"][0] == config.image_token_id).sum()) == config.image_seq_length


# ---------------------------------------------------------------------------------------------------------------------
# What interrupted or failing conversions leave behind (issue #13, item 5)


def test_output_folder_gets_ordinary_permissions(reference_copy, tmp_path):
    dst = tmp_path / "out"
    convert_original_checkpoint(str(reference_copy), str(dst), progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(dst).st_mode & 0o777 == 0o777 & ~umask


def simulate_killed_runs(tmp_path, dst_exists: bool):
    """What `kill -9` leaves: an unfinished output, and (killed between the two renames of --force) the previous
    destination moved aside."""
    converting = tmp_path / ".out.converting-k1ll3d"
    converting.mkdir()
    (converting / "model.safetensors").write_bytes(b"\0" * 4096)
    replaced = tmp_path / ".out.replaced-k1ll3d"
    (replaced / "out").mkdir(parents=True)
    (replaced / "out" / "keep.txt").write_text("the previous destination")
    if dst_exists:
        existing_destination(tmp_path)
    return converting, replaced


def test_leftovers_are_reported_then_removed_with_force(reference_copy, tmp_path, caplog):
    converting, replaced = simulate_killed_runs(tmp_path, dst_exists=False)
    dst = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="dynamic_llava_hf.convert.writer"):
        convert_original_checkpoint(str(reference_copy), str(dst), progress=False)
    messages = caplog.text
    assert str(converting) in messages and "unfinished output of an interrupted conversion" in messages
    assert str(replaced) in messages and "previous destination" in messages and "--force" in messages
    assert f"{dst} is missing: its previous version is {replaced / 'out'}" in messages
    assert sorted(leftovers(tmp_path)) == sorted([converting.name, replaced.name])  # reported, not touched

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dynamic_llava_hf.convert.writer"):
        convert_original_checkpoint(str(reference_copy), str(dst), force=True, progress=False)
    assert "removed once this conversion succeeds" in caplog.text
    assert not leftovers(tmp_path) and os.path.isfile(dst / "model.safetensors")


def test_a_failing_run_keeps_the_leftovers(reference_copy, tmp_path, caplog):
    _, replaced = simulate_killed_runs(tmp_path, dst_exists=False)
    # A failing run (broken source) reports and keeps everything: the previous version is the only copy.
    (reference_copy / "model.safetensors").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="dynamic_llava_hf.convert.writer"):
        argv = ["convert", "original", str(reference_copy), str(tmp_path / "out"), "--no-progress", "--force"]
        assert main(argv) == 1
    assert f"{tmp_path / 'out'} is missing: its previous version is {replaced / 'out'}" in caplog.text
    assert (replaced / "out" / "keep.txt").read_text() == "the previous destination"
    assert len(leftovers(tmp_path)) == 2


WRITE_WITH_FILE_SIZE_LIMIT = r"""
import resource, signal, sys
from dynamic_llava_hf.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the code files fit, the weights do not
sys.exit(main(sys.argv[1:]))
"""


def test_a_write_failure_is_one_line_and_changes_nothing(reference_copy, tmp_path):
    dst = existing_destination(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-c", WRITE_WITH_FILE_SIZE_LIMIT, "convert", "original", str(reference_copy), str(dst)]
        + ["--no-progress", "--force"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert completed.returncode == 1, completed.stderr[-2000:]
    error = completed.stderr.strip().splitlines()[-1]
    assert error.startswith("dynamic-llava convert: error: Writing the converted folder failed")
    assert "File too large" in error and f"{dst} is unchanged" in error and "Traceback" not in completed.stderr
    assert os.listdir(dst) == ["keep.txt"] and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Hub sources and uploads (issue #13, item 8): never the network


def test_a_hub_repo_id_converts_from_the_offline_cache(llava_hf_sources, tmp_path):
    """SRC as a repo id: huggingface_hub resolves it from a populated cache with HF_HUB_OFFLINE=1."""
    _, sources = llava_hf_sources
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-llava"
    shutil.copytree(sources["current"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    dst = tmp_path / "converted"
    command = [sys.executable, "-m", "dynamic_llava_hf_cli", "convert", "llava-hf", "someone/tiny-llava", str(dst)]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command + ["--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Fetched someone/tiny-llava from the Hub" in completed.stdout
    assert (dst / "model.safetensors").is_file() and (dst / "tokenizer_config.json").is_file()
    # A repo id that is not in the cache: one line, no traceback.
    missing = subprocess.run(
        command[:-2] + ["someone/absent", str(tmp_path / "other"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_push_to_hub_uploads_the_verified_folder(llava_hf_sources, tmp_path, monkeypatch):
    """--push-to-hub against a stand-in of the Hub API that records the calls."""
    import huggingface_hub

    _, sources = llava_hf_sources
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))
        return "https://hub.example/someone/out/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    dst = tmp_path / "converted"
    assert main(["convert", "llava-hf", sources["current"], str(dst), "--no-progress", "--push-to-hub", "me/out"]) == 0
    assert [call[:2] for call in calls] == [("create_repo", "me/out"), ("upload_folder", "me/out")]
    assert calls[0][2]["exist_ok"] is True
    assert "model.safetensors" in calls[1][2] and "config.json" in calls[1][2]
