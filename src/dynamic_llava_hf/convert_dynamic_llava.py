"""Conversion of checkpoints into self-contained Dynamic-LLaVA folders.

Two kinds of source:
- official Dynamic-LLaVA checkpoints (LLaVA-1.5 code base, github.com/Osilly/dynamic_llava): LLaVA's original key
  layout (`model.layers.*`, `model.mm_projector.{0,2}`, ...) and a nested `sparse_config`; the CLIP tower comes from
  the folder named by `mm_vision_tower`;
- transformers `LlavaForConditionalGeneration` checkpoints (llava-hf), in the legacy or the current key layout: all
  weights are kept and the predictors are new, freshly initialised (the starting point for training).

The output folder is what `save_pretrained` writes (config with `auto_map`, the remote-code files, safetensors weights,
generation config) plus the processor files when the source has a tokenizer and a filled-in model card (README.md).
It is written into a temporary folder next to the destination, verified tensor by tensor, and only then moved into
place; an existing destination is replaced only with `force=True`, and only after everything succeeded.
Weights are read from safetensors; pickle files (`pytorch_model*.bin`) are refused unless `allow_pickle=True`.
"""

import json
import os
import re
import shlex
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import torch
import transformers
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig

from .configuration_dynamic_llava import DynamicLlavaConfig
from .modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from .processing import (
    LlavaSpecialTokens,
    add_llava_special_tokens,
    build_image_processor,
    build_processor,
    extend_vocab_rows,
    padded_vocab_size,
)


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
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def iter_weights(folder: str, allow_pickle: bool = False, progress: bool = False, description: str = "Reading"):
    """Yields `(name, tensor)` for every tensor of a folder (see `find_weight_files`), one at a time, with a progress
    bar over tensors when asked. Every safetensors header is checked before any tensor is read, so a corrupted shard
    fails fast; errors name the file."""
    files = find_weight_files(folder, allow_pickle)
    if files[0].endswith(".bin"):
        for path in files:
            yield from load_pickle_weights(path).items()
        return
    keys = {path: safetensors_keys(path) for path in files}
    with tqdm(total=sum(map(len, keys.values())), desc=description, unit="tensor", disable=not progress) as bar:
        for path, names in keys.items():
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in names:
                        tensor = handle.get_tensor(name)
                        bar.update()
                        yield name, tensor
            except Exception as error:
                raise CheckpointError(f"Cannot read {path} (corrupted or truncated?): {error}") from error


def read_weights(
    folder: str, allow_pickle: bool = False, progress: bool = False, description: str = "Reading"
) -> dict[str, torch.Tensor]:
    """All tensors of a folder as a dict; checks that no name repeats and that the shards hold what the index lists."""
    tensors = {}
    for name, tensor in iter_weights(folder, allow_pickle, progress, description):
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


def resolve_dtype(dtype: "str | torch.dtype | None") -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------------------------
# Official Dynamic-LLaVA checkpoints

# official `sparse_config` key -> DynamicLlavaConfig field
SPARSE_CONFIG_FIELDS = {
    "sparse_layer": "sparse_layer",
    "use_vision_predictor": "use_vision_predictor",
    "vision_keep_rate": "vision_keep_rate",
    "output_text_keep_rate": "output_text_keep_rate",
    "output_text_len_for_training": "output_text_len_for_training",
    "instruct_keep_rate": "instruct_keep_rate",
    "instruct_len_for_training": "instruct_len_for_training",
    "d_model": "predictor_d_model",
    "nhead": "predictor_num_heads",
    "dim_feedforward": "predictor_ffn_dim",
    "num_layers": "predictor_num_layers",
    "mask_loss_weight": "mask_loss_weight",
}

# official (LLaVA-1.5) state-dict key -> transformers Llava key; predictors keep their names
ORIGINAL_KEY_RENAMES = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.(embed_tokens|layers|norm)\b", r"model.language_model.\1"),
    (r"^model\.(image_score_predictor|output_text_score_predictor|instruct_score_predictor)\.", r"model.\1."),
    (r"^lm_head\.", "lm_head."),
]

VISION_SELECT_STRATEGIES = {"patch": "default", "cls_patch": "full"}
PREDICTORS = {
    "image_score_predictor": "use_vision_predictor",
    "output_text_score_predictor": "use_output_text_predictor",
    "instruct_score_predictor": "use_instruct_predictor",
}


def rename_original_key(key: str) -> str | None:
    """The transformers key of an official checkpoint key, or None for keys that have no counterpart."""
    for pattern, replacement in ORIGINAL_KEY_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def resolve_vision_tower(src: str, original_config: dict, vision_tower: str | None) -> str:
    """`mm_vision_tower` relative to the checkpoint folder when it names a sub-folder there."""
    name = vision_tower or original_config.get("mm_vision_tower")
    if name is None:
        raise ValueError("The checkpoint config has no mm_vision_tower; pass the vision tower folder explicitly")
    relative = os.path.join(src, name)
    return relative if os.path.isdir(relative) else name


def vision_tower_folder(src: str, original_config: dict, vision_tower: str | None) -> str:
    """A local folder with the CLIP tower: `--vision-tower`/`mm_vision_tower` as a folder (relative to SRC first) or,
    failing that, as a Hub repository id (config and safetensors weights only)."""
    name = resolve_vision_tower(src, original_config, vision_tower)
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["config.json", "*.safetensors*", "preprocessor_config.json"])
    except Exception as error:
        raise FileNotFoundError(
            f"Vision tower {name!r} is neither a folder nor a downloadable Hub repository ({error}); pass the local "
            "CLIP folder (e.g. a download of openai/clip-vit-large-patch14-336) as vision_tower / --vision-tower"
        ) from error


def original_config_to_config(
    original: dict,
    vision: dict,
    image_token_id: int | None = None,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    **overrides,
) -> DynamicLlavaConfig:
    """Builds the `DynamicLlavaConfig` of an official checkpoint config (and its CLIP vision config).

    Without a tokenizer the image token gets the id `vocab_size` (one embedding row is appended). `vocab_size` and
    `pad_token_id` set the text vocabulary (e.g. padded to a multiple of 64 after adding `<image>`/`<pad>`).
    """
    if original.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(
            f"Only the mlp2x_gelu projector of LLaVA-1.5 is supported, got {original['mm_projector_type']}"
        )
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature not in VISION_SELECT_STRATEGIES:
        raise ValueError(f"Unsupported mm_vision_select_feature {select_feature!r}")
    if "sparse_config" not in original:
        raise ValueError("This is not a Dynamic-LLaVA checkpoint config: it has no sparse_config")
    sparse = original["sparse_config"]

    original_vocab_size = original["vocab_size"]
    if image_token_id is None:
        image_token_id = original_vocab_size
    text_vocab_size = max(vocab_size or 0, original_vocab_size, image_token_id + 1)
    rope_parameters = {"rope_type": "default", "rope_theta": original.get("rope_theta", 10000.0)}
    if original.get("rope_scaling"):
        rope_parameters.update(original["rope_scaling"])
        rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters.get("rope_type"))
    text_config = LlamaConfig(
        vocab_size=text_vocab_size,
        hidden_size=original["hidden_size"],
        intermediate_size=original["intermediate_size"],
        num_hidden_layers=original["num_hidden_layers"],
        num_attention_heads=original["num_attention_heads"],
        num_key_value_heads=original.get("num_key_value_heads", original["num_attention_heads"]),
        hidden_act=original.get("hidden_act", "silu"),
        max_position_embeddings=original.get("max_position_embeddings", 4096),
        rms_norm_eps=original.get("rms_norm_eps", 1e-6),
        rope_parameters=rope_parameters,
        attention_bias=original.get("attention_bias", False),
        pad_token_id=pad_token_id if pad_token_id is not None else original.get("pad_token_id"),
        bos_token_id=original.get("bos_token_id", 1),
        eos_token_id=original.get("eos_token_id", 2),
        tie_word_embeddings=original.get("tie_word_embeddings", False),
    )
    vision = {key: value for key, value in vision.items() if key not in ("architectures", "transformers_version")}
    vision_config = CLIPVisionConfig(**vision)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    strategy = VISION_SELECT_STRATEGIES[select_feature]

    fields = {field: sparse[key] for key, field in SPARSE_CONFIG_FIELDS.items() if key in sparse}
    use_text = sparse.get("use_text_predictor", True)
    fields["use_output_text_predictor"] = bool(use_text and sparse.get("use_output_text_predictor", True))
    fields["use_instruct_predictor"] = bool(use_text and sparse.get("use_instruct_predictor", False))
    fields.update(overrides)
    return DynamicLlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_id,
        image_seq_length=patches + (1 if strategy == "full" else 0),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
        **fields,
    )


def original_state_dict_to_state_dict(
    tensors: dict[str, torch.Tensor], config: DynamicLlavaConfig, vision_tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Renames official keys to ours, takes CLIP from `vision_tensors` (keys `vision_model.*`) when given, drops the
    predictors the config does not build, and appends embedding/`lm_head` rows up to the text vocabulary size."""
    state_dict = {}
    for key, tensor in tensors.items():
        new_key = rename_original_key(key)
        if new_key is None:
            raise ValueError(f"Unexpected key in the official checkpoint: {key}")
        if vision_tensors is not None and new_key.startswith("model.vision_tower."):
            continue
        state_dict[new_key] = tensor
    for key, tensor in (vision_tensors or {}).items():
        state_dict["model.vision_tower." + key.removeprefix("vision_model.")] = tensor

    for module, flag in PREDICTORS.items():
        prefix = f"model.{module}."
        if not getattr(config, flag):
            state_dict = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}
        elif not any(key.startswith(prefix) for key in state_dict):
            raise ValueError(f"config.{flag}=True but the checkpoint has no {module} weights")

    vocab_size = config.text_config.vocab_size
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in state_dict:
            # New rows (image token, pad, padding) are never read or are suppressed; see `extend_vocab_rows`.
            state_dict[key] = extend_vocab_rows(state_dict[key], vocab_size)
    return state_dict


def load_original_checkpoint(
    src: str, vision_tower: str | None = None, dtype: torch.dtype | None = None, **config_overrides
) -> DynamicLlavaForConditionalGeneration:
    """Loads an official Dynamic-LLaVA checkpoint folder into `DynamicLlavaForConditionalGeneration` (in memory).

    `config_overrides` set `DynamicLlavaConfig` fields, e.g. `use_instruct_predictor=True` to build the instruct
    predictor from weights a checkpoint carries while its config has it off.
    """
    original = read_json(os.path.join(src, "config.json"))
    vision_folder = resolve_vision_tower(src, original, vision_tower)
    if not os.path.isdir(vision_folder):
        raise FileNotFoundError(
            f"Vision tower folder {vision_folder!r} not found; pass the local CLIP folder (e.g. a download of "
            "openai/clip-vit-large-patch14-336) as vision_tower"
        )
    vision_config = read_json(os.path.join(vision_folder, "config.json"))
    config = original_config_to_config(original, vision_config, **config_overrides)
    state_dict = original_state_dict_to_state_dict(
        read_safetensors_folder(src), config, read_safetensors_folder(vision_folder)
    )
    model = DynamicLlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"Checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    model.generation_config.suppress_tokens = [config.image_token_id]
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# transformers Llava (llava-hf) checkpoints

# Legacy layout (transformers < 4.52, e.g. llava-hf/llava-1.5-7b-hf) and current layout -> our keys. CLIP's
# `vision_model.` level (absent in transformers 5's in-memory names) is removed afterwards.
LLAVA_HF_KEY_RENAMES = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."),
    (r"^model\.(language_model|vision_tower|multi_modal_projector)\.", r"model.\1."),
    (r"^lm_head\.", "lm_head."),
]
# Fields of LlavaConfig carried over as they are.
LLAVA_CONFIG_FIELDS = (
    "image_token_index",
    "image_seq_length",
    "projector_hidden_act",
    "vision_feature_select_strategy",
    "vision_feature_layer",
    "multimodal_projector_bias",
    "tie_word_embeddings",
)


def rename_llava_hf_key(key: str) -> str | None:
    """Our key of a llava-hf checkpoint key (legacy or current layout), or None for keys with no counterpart."""
    for pattern, replacement in LLAVA_HF_KEY_RENAMES:
        if re.match(pattern, key):
            return re.sub(
                r"^model\.vision_tower\.vision_model\.", "model.vision_tower.", re.sub(pattern, replacement, key)
            )
    return None


def llava_hf_config_to_config(src: str, **overrides) -> DynamicLlavaConfig:
    """The `DynamicLlavaConfig` of a llava-hf folder: its Llava settings plus the sparse settings (`overrides`)."""
    model_type = read_json(os.path.join(src, "config.json")).get("model_type")
    if model_type != "llava":
        raise CheckpointError(
            f"{src}/config.json has model_type {model_type!r}; `convert llava-hf` expects a transformers "
            "LlavaForConditionalGeneration checkpoint (model_type 'llava')"
        )
    llava = LlavaConfig.from_pretrained(src)
    fields = {name: getattr(llava, name) for name in LLAVA_CONFIG_FIELDS}
    fields.update(overrides)
    return DynamicLlavaConfig(text_config=llava.text_config, vision_config=llava.vision_config, **fields)


def llava_hf_state_dict_to_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = {}
    for key, tensor in tensors.items():
        new_key = rename_llava_hf_key(key)
        if new_key is None:
            raise CheckpointError(f"Unexpected key in the llava-hf checkpoint: {key}")
        if new_key in state_dict:
            raise CheckpointError(f"Two keys of the llava-hf checkpoint map to {new_key} (mixed layouts?)")
        state_dict[new_key] = tensor
    return state_dict


# ---------------------------------------------------------------------------------------------------------------------
# Building, writing and verifying the output


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote."""

    dst: str
    num_tensors: int
    new_keys: tuple[str, ...]  # freshly initialised tensors (the predictors of a llava-hf source)
    processor_written: bool
    special_tokens: LlavaSpecialTokens | None


def build_model(
    config: DynamicLlavaConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    fresh_modules: tuple[str, ...] = (),
    seed: int = 0,
    progress: bool = False,
) -> tuple[DynamicLlavaForConditionalGeneration, tuple[str, ...]]:
    """The model holding the tensors of `state_dict` (consumed; no copy unless cast to `dtype`: the model is built on
    the meta device and the tensors assigned), with `fresh_modules` initialised like `from_pretrained` initialises
    missing weights (`_init_weights`, seeded). Returns it and the keys that were initialised. Any other missing or
    unexpected key is an error."""
    with torch.device("meta"):
        model = DynamicLlavaForConditionalGeneration(config)
    new_keys = tuple(key for key in model.state_dict() if key.split(".")[1] in fresh_modules)
    missing = set(model.state_dict()) - set(state_dict) - set(new_keys)
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
        state_dict.pop("lm_head.weight", None)
    unexpected = set(state_dict) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"The checkpoint does not match the model: missing {sorted(missing)[:10]}, "
            f"unexpected {sorted(unexpected)[:10]}"
        )
    shapes = model.state_dict()
    converted = {}
    for key in tqdm(list(state_dict), desc="Converting", unit="tensor", disable=not progress):
        tensor = state_dict.pop(key)  # the source tensor is released as soon as it is cast
        if tensor.shape != shapes[key].shape:
            raise CheckpointError(f"{key} has shape {list(tensor.shape)}, the config needs {list(shapes[key].shape)}")
        converted[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    model.load_state_dict(converted, strict=False, assign=True)

    if fresh_modules:
        fresh_dtype = dtype or converted["model.language_model.embed_tokens.weight"].dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for name in fresh_modules:
                module = model.model.get_submodule(name)
                module.to_empty(device="cpu")
                module.apply(model._init_weights)
                module.to(fresh_dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    still_meta = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if still_meta:
        raise CheckpointError(f"No weights for {still_meta[:10]}")
    return model, new_keys


def verify_saved_weights(model, folder: str, progress: bool = False) -> int:
    """Re-reads every written tensor (one at a time) and compares it bit for bit with the model's; returns the number
    of tensors. Raises `RuntimeError` naming the first difference."""
    expected = model.state_dict()
    seen = set()
    for key, tensor in iter_weights(folder, progress=progress, description="Verifying"):
        if key not in expected or key in seen:
            raise RuntimeError(f"Verification of {folder} failed: unexpected or repeated tensor {key}")
        if tensor.dtype != expected[key].dtype or not torch.equal(tensor, expected[key]):
            raise RuntimeError(f"Verification of {folder} failed: {key} differs from the converted tensor")
        seen.add(key)
    unwritten = set(expected) - seen
    if model.config.tie_word_embeddings:
        unwritten.discard("lm_head.weight")
    if unwritten:
        raise RuntimeError(f"Verification of {folder} failed: not written {sorted(unwritten)[:10]}")
    return len(seen)


def check_destination(src: str, dst: str, force: bool) -> None:
    source, target = os.path.realpath(src), os.path.realpath(dst)
    if source == target or target.startswith(source + os.sep) or source.startswith(target + os.sep):
        raise ValueError(f"The destination {dst} must be outside the source {src} (and not contain it)")
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")


@contextmanager
def staged_folder(dst: str, force: bool):
    """Yields a temporary folder next to `dst` that becomes `dst` when the block succeeds (an existing `dst` is
    replaced only then, and only with `force`); on any error the temporary folder is removed and `dst` untouched."""
    dst = os.path.abspath(dst)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.converting-", dir=parent)
    try:
        yield staging
        if os.path.lexists(dst):
            if not force:
                raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
            retired = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.rename(dst, os.path.join(retired, name))
            try:
                os.rename(staging, dst)
            except BaseException:
                os.rename(os.path.join(retired, name), dst)
                raise
            shutil.rmtree(retired)
        else:
            os.rename(staging, dst)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


# ---------------------------------------------------------------------------------------------------------------------
# Model card

MODEL_CARD_FIELD = re.compile(r"\{\{ (\w+) \}\}")


def model_card_template() -> str:
    """The MODEL_CARD.md template shipped inside the package (a copy of the repository's MODEL_CARD.md)."""
    return resources.files("dynamic_llava_hf").joinpath("MODEL_CARD.md").read_text(encoding="utf-8")


def render_model_card(values: dict[str, str]) -> str:
    """The template with every `{{ field }}` replaced; a field without a value is an error."""

    def fill(match):
        if match.group(1) not in values:
            raise KeyError(f"The model card template needs a value for {match.group(1)!r}")
        return str(values[match.group(1)])

    return MODEL_CARD_FIELD.sub(fill, model_card_template())


def model_card_values(
    config: DynamicLlavaConfig,
    dst: str,
    source_description: str,
    command: str,
    base_model: str | None,
    license: str | None,
    model_id: str | None,
    processor_written: bool,
    untrained_predictors: bool,
) -> dict[str, str]:
    from . import __version__

    tokens = config.image_seq_length
    settings = [
        ("sparse_layer", config.sparse_layer, "decoder layer at whose input tokens are pruned"),
        ("use_vision_predictor", config.use_vision_predictor, "prune image tokens at prefill"),
        (
            "vision_keep_rate",
            config.vision_keep_rate,
            f"{int(tokens * config.vision_keep_rate)} of {tokens} image tokens kept per image",
        ),
        (
            "use_output_text_predictor",
            config.use_output_text_predictor,
            "drop generated tokens' KV in layers >= sparse_layer",
        ),
        ("use_instruct_predictor", config.use_instruct_predictor, "prune the prompt text after the image"),
    ]
    notes = []
    if untrained_predictors:
        notes.append(
            "> **The predictors of this checkpoint are freshly initialised, not trained.** It is a starting point for "
            "Dynamic-LLaVA training; until then, use it with `sparsity=False` (identical to the source model)."
        )
    if not processor_written:
        notes.append(
            "> The source had no tokenizer, so this folder has no processor files: add a LLaVA-1.5 tokenizer with "
            "`dynamic_llava_hf.add_llava_special_tokens` and save `dynamic_llava_hf.build_processor(tokenizer)` "
            "here before running the examples below."
        )
    return {
        "license": license or "other",
        "base_model_line": f"base_model: {base_model}" if base_model else "# base_model: set the Hub id of the source",
        "model_name": os.path.basename(os.path.abspath(dst)),
        "source_description": source_description,
        "conversion_command": command,
        "notes": "\n\n".join(notes),
        "sparse_settings": "\n".join(f"| `{name}` | {value} | {meaning} |" for name, value, meaning in settings),
        "image_size": str(config.vision_config.image_size),
        "image_tokens": str(tokens),
        "model_id": model_id or dst,
        "package_version": __version__,
        "transformers_version": transformers.__version__,
    }


def cli_command(kind: str, src: str, dst: str, options: dict) -> str:
    """The `dynamic-llava convert` command equivalent to a Python call (for the model card)."""
    words = ["dynamic-llava", "convert", kind, src, dst]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + name.replace("_", "-"))
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def write_output(model, dst: str, force: bool, processor, card_values: dict[str, str], progress: bool) -> int:
    """Writes model, processor (an object with `save_pretrained`, or files to copy) and model card; verifies."""
    with staged_folder(dst, force) as staging:
        bars_enabled = transformers.utils.logging.is_progress_bar_enabled()
        if not progress:  # transformers' own "Writing model shards" bar
            transformers.utils.logging.disable_progress_bar()
        try:
            model.save_pretrained(staging, max_shard_size="5GB")
        finally:
            if bars_enabled:
                transformers.utils.logging.enable_progress_bar()
        if isinstance(processor, list):
            for path in processor:
                shutil.copy2(path, staging)
        elif processor is not None:
            processor.save_pretrained(staging)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(render_model_card(card_values))
        return verify_saved_weights(model, staging, progress)


def generation_config_for(src: str, config: DynamicLlavaConfig, suppress_tokens: list[int], pad_token_id=None):
    if os.path.isfile(os.path.join(src, "generation_config.json")):
        generation_config = GenerationConfig.from_pretrained(src)
    else:
        generation_config = GenerationConfig.from_model_config(config)
    # A generated image placeholder (or a padding row) would break the next step; those ids are never sampled.
    generation_config.suppress_tokens = sorted(set(generation_config.suppress_tokens or []) | set(suppress_tokens))
    if pad_token_id is not None:
        generation_config.pad_token_id = pad_token_id
    return generation_config


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def convert_original_checkpoint(
    src: str,
    dst: str,
    vision_tower: str | None = None,
    dtype: "str | torch.dtype | None" = None,
    force: bool = False,
    allow_pickle: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    model_id: str | None = None,
    progress: bool = True,
    **config_overrides,
) -> ConversionResult:
    """Converts an official Dynamic-LLaVA checkpoint folder into a self-contained Dynamic-LLaVA folder `dst`.

    With a tokenizer in `src`, `<image>` and `<pad>` are added as llava-hf does (ids = old vocabulary size, +1; the
    vocabulary padded to a multiple of 64) and the processor files are written; without one the image token id is the
    old vocabulary size (one row appended). `config_overrides` set `DynamicLlavaConfig` fields (e.g.
    `use_instruct_predictor=True`). `dtype` casts the floating-point weights (default: keep them).
    """
    dtype = resolve_dtype(dtype)
    check_destination(src, dst, force)
    original = read_json(os.path.join(src, "config.json"))
    vision_folder = vision_tower_folder(src, original, vision_tower)
    vision = read_json(os.path.join(vision_folder, "config.json"))

    tokenizer, special_tokens, token_fields = None, None, {}
    if has_tokenizer(src):
        tokenizer = load_tokenizer(src)
        if len(tokenizer) > original["vocab_size"]:
            raise CheckpointError(
                f"The tokenizer in {src} has {len(tokenizer)} tokens, more than the model's {original['vocab_size']}"
            )
        special_tokens = add_llava_special_tokens(tokenizer)
        token_fields = {
            "image_token_id": special_tokens.image_token_id,
            "vocab_size": padded_vocab_size(max(original["vocab_size"], len(tokenizer))),
            "pad_token_id": special_tokens.pad_token_id,
        }
    config = original_config_to_config(original, vision, **token_fields, **config_overrides)
    state_dict = original_state_dict_to_state_dict(
        read_weights(src, allow_pickle, progress, f"Reading {os.path.basename(src) or src}"),
        config,
        read_weights(vision_folder, allow_pickle, progress, "Reading the vision tower"),
    )
    model, _ = build_model(config, state_dict, dtype, progress=progress)
    # Ids the source model never produced: the image placeholder, <pad> and the padding rows.
    new_ids = set(range(original["vocab_size"], config.text_config.vocab_size)) | {config.image_token_id}
    pad_token_id = None
    if special_tokens is not None:
        pad_token_id = special_tokens.pad_token_id
        new_ids.add(pad_token_id)
    model.generation_config = generation_config_for(src, config, sorted(new_ids), pad_token_id)

    processor = None
    if tokenizer is not None:
        processor = llava_processor(tokenizer, config.vision_config, vision_folder)
    options = {"vision_tower": vision_tower, "dtype": _dtype_name(dtype), "force": force or None}
    options.update(allow_pickle=allow_pickle or None, **config_overrides)
    card = model_card_values(
        config,
        dst,
        f"the official Dynamic-LLaVA checkpoint `{os.path.basename(os.path.abspath(src))}`",
        cli_command("original", src, dst, options),
        base_model,
        license,
        model_id,
        processor is not None,
        untrained_predictors=False,
    )
    num_tensors = write_output(model, dst, force, processor, card, progress)
    return ConversionResult(os.path.abspath(dst), num_tensors, (), processor is not None, special_tokens)


def convert_llava_hf_checkpoint(
    src: str,
    dst: str,
    dtype: "str | torch.dtype | None" = None,
    force: bool = False,
    allow_pickle: bool = False,
    processor: str = "llava-1.5",
    base_model: str | None = None,
    license: str | None = None,
    model_id: str | None = None,
    seed: int = 0,
    progress: bool = True,
    **config_overrides,
) -> ConversionResult:
    """Converts a transformers `LlavaForConditionalGeneration` folder (legacy or current key layout) into a
    Dynamic-LLaVA folder whose predictors are freshly initialised (seeded with `seed`); all other weights are copied.

    `config_overrides` set the sparse fields (e.g. `vision_keep_rate=0.25`, `predictor_d_model=256`). `processor`:
    "llava-1.5" (default) writes a processor with LLaVA-1.5's preprocessing (pad to square) and the vicuna_v1 chat
    template, built from the source tokenizer; "source" copies the source's processor files unchanged.
    """
    if processor not in ("llava-1.5", "source"):
        raise ValueError(f"processor must be 'llava-1.5' or 'source', got {processor!r}")
    dtype = resolve_dtype(dtype)
    check_destination(src, dst, force)
    config = llava_hf_config_to_config(src, **config_overrides)
    state_dict = llava_hf_state_dict_to_state_dict(
        read_weights(src, allow_pickle, progress, f"Reading {os.path.basename(src) or src}")
    )
    fresh = tuple(module for module, flag in PREDICTORS.items() if getattr(config, flag))
    model, new_keys = build_model(config, state_dict, dtype, fresh, seed, progress)
    model.generation_config = generation_config_for(src, config, [config.image_token_id])

    source_processor, special_tokens = None, None
    if has_tokenizer(src):
        if processor == "source":
            source_processor = [os.path.join(src, name) for name in PROCESSOR_FILES]
            source_processor = [path for path in source_processor if os.path.isfile(path)]
        else:
            tokenizer = load_tokenizer(src)
            special_tokens = add_llava_special_tokens(tokenizer)
            if special_tokens.image_token_id != config.image_token_id:
                raise CheckpointError(
                    f"The tokenizer's <image> id {special_tokens.image_token_id} differs from the config's "
                    f"image_token_index {config.image_token_id}"
                )
            if len(tokenizer) > config.text_config.vocab_size:
                raise CheckpointError(
                    f"The tokenizer has {len(tokenizer)} tokens, more than the {config.text_config.vocab_size} rows "
                    "of the embeddings"
                )
            source_processor = llava_processor(tokenizer, config.vision_config, src)
    options = {"dtype": _dtype_name(dtype), "force": force or None, "allow_pickle": allow_pickle or None}
    options.update(processor=None if processor == "llava-1.5" else processor, **config_overrides)
    card = model_card_values(
        config,
        dst,
        f"the transformers Llava checkpoint `{os.path.basename(os.path.abspath(src))}`",
        cli_command("llava-hf", src, dst, options),
        base_model,
        license,
        model_id,
        source_processor is not None,
        untrained_predictors=bool(new_keys),
    )
    num_tensors = write_output(model, dst, force, source_processor, card, progress)
    return ConversionResult(os.path.abspath(dst), num_tensors, new_keys, source_processor is not None, special_tokens)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


__all__ = [
    "CheckpointError",
    "ConversionResult",
    "convert_llava_hf_checkpoint",
    "convert_original_checkpoint",
    "load_original_checkpoint",
    "original_config_to_config",
    "original_state_dict_to_state_dict",
    "read_safetensors_folder",
    "read_weights",
    "rename_llava_hf_key",
    "rename_original_key",
]
