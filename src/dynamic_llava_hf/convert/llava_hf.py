"""transformers `LlavaForConditionalGeneration` checkpoints (llava-hf, legacy or current key layout) -> Dynamic-LLaVA
with freshly initialised predictors (the starting point for training)."""

import os
import re

import torch
from transformers import LlavaConfig

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..processing import (
    add_llava_special_tokens,
)
from ..utils import dtype_name, torch_dtype
from .reading import (
    PROCESSOR_FILES,
    CheckpointError,
    has_tokenizer,
    llava_processor,
    load_tokenizer,
    read_json,
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
# Entry point


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

    The predictors are untrained, so the config says `predictors_trained=False`: without `sparsity=` the converted
    model computes exactly what the source does (a training-free `vision_selector="fastv"`/`"random"` still prunes
    image tokens) until training, `sparsity=True` or `predictors_trained=True` switches the learned predictors on.

    `config_overrides` set the sparse fields (e.g. `vision_keep_rate=0.25`, `predictor_d_model=256`). `processor`:
    "llava-1.5" (default) writes a processor with LLaVA-1.5's preprocessing (pad to square) and the vicuna_v1 chat
    template, built from the source tokenizer; "source" copies the source's processor files unchanged.
    """
    if processor not in ("llava-1.5", "source"):
        raise ValueError(f"processor must be 'llava-1.5' or 'source', got {processor!r}")
    dtype = torch_dtype(dtype)
    check_destination(src, dst, force)
    config = llava_hf_config_to_config(src, **{"predictors_trained": False, **config_overrides})
    with reading_bar([src], allow_pickle, progress) as bar:
        state_dict = llava_hf_state_dict_to_state_dict(read_weights(src, allow_pickle, bar))
    fresh = tuple(module for module, flag in PREDICTORS.items() if getattr(config, flag))
    model, new_keys = build_model(config, state_dict, dtype, fresh, seed)
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
    options = {"dtype": dtype_name(dtype), "force": force or None, "allow_pickle": allow_pickle or None}
    options.update(processor=None if processor == "llava-1.5" else processor, **config_overrides)
    card = model_card(
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
