"""Official Dynamic-LLaVA checkpoints (LLaVA-1.5 code base, github.com/Osilly/dynamic_llava): LLaVA's original key
layout and a nested `sparse_config` -> a self-contained Dynamic-LLaVA folder."""

import os
import re

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from ..configuration_dynamic_llava import FIELD_CHECKS, DynamicLlavaConfig, as_bool
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..processing import (
    add_llava_special_tokens,
    extend_vocab_rows,
    padded_vocab_size,
)
from ..utils import dtype_name, torch_dtype
from .reading import (
    CheckpointError,
    has_tokenizer,
    llava_processor,
    load_tokenizer,
    local_or_hub_folder,
    read_json,
    read_safetensors_folder,
    read_weights,
    reading_bar,
)
from .writer import (
    PREDICTORS,
    ConversionResult,
    build_model,
    check_destination,
    cli_command,
    generation_config_for,
    model_card,
    write_output,
)

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
    try:
        folder = local_or_hub_folder(name, ["config.json", "*.safetensors*", "preprocessor_config.json"])
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is not a folder")
    except Exception as error:
        raise FileNotFoundError(
            f"Vision tower {name!r} is neither a folder nor a downloadable Hub repository ({error}); pass the local "
            "CLIP folder (e.g. a download of openai/clip-vit-large-patch14-336) as vision_tower / --vision-tower"
        ) from error
    return folder


# Keys of the official config.json without a sensible default.
REQUIRED_ORIGINAL_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def read_original_config(src: str) -> dict:
    """The official checkpoint's config.json, checked for the keys the conversion cannot guess."""
    path = os.path.join(src, "config.json")
    original = read_json(path)
    if "sparse_config" not in original:
        raise CheckpointError(f"{path} is not a Dynamic-LLaVA checkpoint config: it has no sparse_config")
    missing = [key for key in REQUIRED_ORIGINAL_KEYS if key not in original]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: the conversion needs them to size the model")
    return original


def original_sparse_fields(sparse: dict) -> dict:
    """The `DynamicLlavaConfig` fields of an official `sparse_config`, each checked under its official name (a JSON
    string "false" is an error, not a truthy value)."""
    fields = {}
    for key, field in SPARSE_CONFIG_FIELDS.items():
        if key in sparse:
            fields[field] = FIELD_CHECKS[field](f"sparse_config.{key}", sparse[key])
    flags = {
        key: as_bool(f"sparse_config.{key}", sparse.get(key, default))
        for key, default in (
            ("use_text_predictor", True),
            ("use_output_text_predictor", True),
            ("use_instruct_predictor", False),
        )
    }
    fields["use_output_text_predictor"] = flags["use_text_predictor"] and flags["use_output_text_predictor"]
    fields["use_instruct_predictor"] = flags["use_text_predictor"] and flags["use_instruct_predictor"]
    return fields


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

    if "vocab_size" not in original:
        raise CheckpointError("The checkpoint config has no vocab_size: the conversion needs it to size the model")
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

    fields = original_sparse_fields(sparse)
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
    src: str, vision_tower: str | None = None, dtype: "str | torch.dtype | None" = None, **config_overrides
) -> DynamicLlavaForConditionalGeneration:
    """Loads an official Dynamic-LLaVA checkpoint folder into `DynamicLlavaForConditionalGeneration` (in memory).

    `config_overrides` set `DynamicLlavaConfig` fields, e.g. `use_instruct_predictor=True` to build the instruct
    predictor from weights a checkpoint carries while its config has it off.
    """
    dtype = torch_dtype(dtype)
    original = read_original_config(src)
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
# Entry point


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
    dtype = torch_dtype(dtype)
    check_destination(src, dst, force)
    original = read_original_config(src)
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
    with reading_bar([src, vision_folder], allow_pickle, progress) as bar:
        state_dict = original_state_dict_to_state_dict(
            read_weights(src, allow_pickle, bar), config, read_weights(vision_folder, allow_pickle, bar)
        )
    model, _ = build_model(config, state_dict, dtype)
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
    options = {"vision_tower": vision_tower, "dtype": dtype_name(dtype), "force": force or None}
    options.update(allow_pickle=allow_pickle or None, **config_overrides)
    card = model_card(
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
