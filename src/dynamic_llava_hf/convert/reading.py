"""Reading source checkpoints: weights (safetensors, pickle only on request), tokenizer, image normalisation."""

import json
import os
import warnings

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from ..processing import (
    build_image_processor,
    build_processor,
)
from ..utils import progress_bar


class CheckpointError(ValueError):
    """A source checkpoint that cannot be converted (corrupted, incomplete, unexpected layout, pickle weights)."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading source folders

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# What `processor.save_pretrained` writes (transformers 5 and older layouts); copied as they are by processor="source".
PROCESSOR_FILES = TOKENIZER_FILES + (
    "special_tokens_map.json",
    "added_tokens.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def local_or_hub_folder(name: str, allow_patterns: list[str]) -> str:
    """`name` when it is a local path; else, if it is a Hub repository id, the local copy of its files that match
    `allow_patterns` (huggingface_hub's cache, so `HF_HUB_OFFLINE=1` works from a populated one); else `name` itself,
    for the caller's own "not found" error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name):
        return name
    try:
        validate_repo_id(name)
    except HFValidationError:
        return name
    return snapshot_download(name, allow_patterns=allow_patterns)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def find_weight_files(folder: str, allow_pickle: bool = False) -> list[str]:
    """Paths of a folder's weight files: `model.safetensors` or the shards of `model.safetensors.index.json`; only
    with `allow_pickle`, `pytorch_model.bin` or its shards. Raises naming the folder or the missing file."""
    for index_name, single_name, is_pickle in (
        ("model.safetensors.index.json", "model.safetensors", False),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", True),
    ):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no weight_map")
            files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
        elif os.path.isfile(os.path.join(folder, single_name)):
            files = [os.path.join(folder, single_name)]
        else:
            continue
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Weight file {path} (listed in {index_path}) is missing")
        if is_pickle and not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(os.path.basename(path) for path in files)}). "
                "Unpickling can run arbitrary code, so it is refused: convert them to safetensors, or pass "
                "--allow-pickle (allow_pickle=True) if you trust where they come from."
            )
        return files
    raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {folder}")


def safetensors_keys(path: str) -> list[str]:
    """The tensor names in a safetensors file's header; raises naming the file when it is corrupted or truncated."""
    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:
        raise CheckpointError(f"Cannot read {path} (corrupted or truncated safetensors file?): {error}") from error


def load_pickle_weights(path: str) -> dict[str, torch.Tensor]:
    warnings.warn(
        f"UNPICKLING {path} because allow_pickle=True was given. torch.load(weights_only=True) restricts what the "
        "file may contain, but only load pickles from sources you trust.",
        UserWarning,
        stacklevel=3,
    )
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"Cannot read {path}: {error}") from error
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return tensors


def reading_bar(folders: list[str], allow_pickle: bool, progress: bool, description: str = "Reading"):
    """One progress bar over the bytes of every weight file in `folders` (bytes, not tensors: tensors differ in size
    by orders of magnitude, so a bar counting them would give wild estimates)."""
    files = [path for folder in folders for path in find_weight_files(folder, allow_pickle)]
    total = sum(os.path.getsize(path) for path in files)
    return progress_bar(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, enabled=progress)


def iter_weights(folder: str, allow_pickle: bool = False, bar=None):
    """Yields `(name, tensor)` for every tensor of a folder (see `find_weight_files`), one at a time, advancing `bar`
    (see `reading_bar`) by the bytes read. Every safetensors header is checked before any tensor is read, so a
    corrupted shard fails fast; errors name the file."""
    bar = progress_bar(enabled=False) if bar is None else bar
    files = find_weight_files(folder, allow_pickle)
    if files[0].endswith(".bin"):
        for path in files:
            yield from load_pickle_weights(path).items()
            bar.update(os.path.getsize(path))
        return
    keys = {path: safetensors_keys(path) for path in files}
    for path, names in keys.items():
        read = 0
        try:
            with safe_open(path, framework="pt") as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    read += tensor.nbytes
                    bar.update(tensor.nbytes)
                    yield name, tensor
        except Exception as error:
            raise CheckpointError(f"Cannot read {path} (corrupted or truncated?): {error}") from error
        bar.update(os.path.getsize(path) - read)  # the file's header


def read_weights(folder: str, allow_pickle: bool = False, bar=None) -> dict[str, torch.Tensor]:
    """All tensors of a folder as a dict; checks that no name repeats and that the shards hold what the index lists.
    `bar`: see `iter_weights`."""
    tensors = {}
    for name, tensor in iter_weights(folder, allow_pickle, bar):
        if name in tensors:
            raise CheckpointError(f"Tensor {name} appears twice in the weight files of {folder}")
        tensors[name] = tensor
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        listed = set(read_json(index_path)["weight_map"])
        if listed != set(tensors):
            missing = sorted(listed - set(tensors))[:5]
            extra = sorted(set(tensors) - listed)[:5]
            raise CheckpointError(f"The shards do not match {index_path}: missing {missing}, not listed {extra}")
    return tensors


def read_safetensors_folder(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a folder's `model.safetensors` or sharded `model-*.safetensors` (never pickles)."""
    return read_weights(folder)


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def load_tokenizer(folder: str):
    try:
        with warnings.catch_warnings():
            # AutoTokenizer also parses the folder's model config, which warns about LLaVA's legacy rope_scaling.
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise CheckpointError(f"Cannot load the tokenizer in {folder}: {error}") from error


def image_normalisation(folder: str) -> tuple[list[float] | None, list[float] | None]:
    """`image_mean`/`image_std` of a folder's image processor files, or (None, None) (CLIP's values then apply)."""
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            settings = read_json(path)
            settings = settings.get(section, {}) if section else settings
            if "image_mean" in settings and "image_std" in settings:
                return settings["image_mean"], settings["image_std"]
    return None, None


def llava_processor(tokenizer, vision_config, normalisation_folder: str):
    """LLaVA-1.5 processor for a vision tower's image size and patch, with the mean/std found in
    `normalisation_folder` (CLIP's otherwise)."""
    mean, std = image_normalisation(normalisation_folder)
    image_processor = build_image_processor(vision_config.image_size, mean, std)
    return build_processor(tokenizer, image_processor, vision_config.image_size, vision_config.patch_size)
