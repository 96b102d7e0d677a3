"""The shared writer: build the model from converted tensors, write it with processor and model card into a staged
folder, verify every tensor, move it into place."""

import logging
import os
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources

import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError
from transformers import GenerationConfig

from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..modeling_dynamic_llava import DynamicLlavaForConditionalGeneration
from ..processing import (
    LlavaSpecialTokens,
)
from .reading import CheckpointError, iter_weights, reading_bar

logger = logging.getLogger(__name__)

# The predictor sub-modules and the config flags that switch them on.
PREDICTORS = {
    "image_score_predictor": "use_vision_predictor",
    "output_text_score_predictor": "use_output_text_predictor",
    "instruct_score_predictor": "use_instruct_predictor",
}


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
    for key in list(state_dict):
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
    with reading_bar([folder], allow_pickle=False, progress=progress, description="Verifying") as bar:
        for key, tensor in iter_weights(folder, bar=bar):
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
    report_leftovers(dst, force)
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")


# What interrupted conversions leave beside DST (a full copy of the weights each), and what each one is.
LEFTOVER_KINDS = {
    "converting": "the unfinished output of an interrupted conversion",
    "replaced": "the previous destination, moved aside by an interrupted --force run",
}


def leftover_folders(dst: str) -> list[tuple[str, str]]:
    """`(path, kind)` of the `.DST.converting-*` / `.DST.replaced-*` folders beside `dst`."""
    parent, name = os.path.split(os.path.abspath(dst))
    if not os.path.isdir(parent):
        return []
    found = []
    for entry in sorted(os.listdir(parent)):
        for kind in LEFTOVER_KINDS:
            if entry.startswith(f".{name}.{kind}-") and os.path.isdir(os.path.join(parent, entry)):
                found.append((os.path.join(parent, entry), kind))
    return found


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, file)) for root, _, files in os.walk(path) for file in files)


def report_leftovers(dst: str, force: bool) -> None:
    """Logs each folder an interrupted conversion to `dst` left behind (at the start of a conversion). With `force`
    they are removed once the new `dst` is in place (see `staged_folder`), so a failing run never deletes the only
    copy of a previous destination."""
    for path, kind in leftover_folders(dst):
        action = "removed once this conversion succeeds (--force)" if force else "remove it, or pass --force"
        logger.warning(f"{path} ({folder_size(path) / 2**20:,.1f} MiB) is {LEFTOVER_KINDS[kind]}: {action}")
        previous = os.path.join(path, os.path.basename(os.path.abspath(dst)))
        if kind == "replaced" and not os.path.lexists(dst) and os.path.isdir(previous):
            logger.warning(f"{dst} is missing: its previous version is {previous}; move it back to restore it")


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def staged_folder(dst: str, force: bool):
    """Yields a temporary folder next to `dst` that becomes `dst` when the block succeeds (an existing `dst` is
    replaced only then, and only with `force`); on any error the temporary folder is removed and `dst` untouched.

    With `force`, leftovers of interrupted conversions to `dst` (see `report_leftovers`) are removed after the move."""
    dst = os.path.abspath(dst)
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    leftovers = [path for path, _ in leftover_folders(dst)]  # listed before this run adds its own
    staging = tempfile.mkdtemp(prefix=f".{name}.converting-", dir=parent)
    # mkdtemp creates drwx------; the output is an ordinary folder, with the permissions mkdir would give it.
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
        if os.path.lexists(dst):
            if not force:
                raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
            replace_destination(staging, dst)
        else:
            os.rename(staging, dst)
        if force:
            for path in leftovers:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


def replace_destination(staging: str, dst: str) -> None:
    """Moves `staging` to `dst` (which exists). The old `dst` stays whole until the new one is in place: it is moved
    aside into a `.DST.replaced-*` folder first and deleted only after the swap; if the swap fails it is moved back,
    and if even that fails the error says where it is."""
    parent, name = os.path.split(dst)
    retired = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
    previous = os.path.join(retired, name)
    os.rename(dst, previous)
    try:
        os.rename(staging, dst)
    except BaseException:
        try:
            os.rename(previous, dst)
        except OSError as error:
            raise OSError(
                f"Replacing {dst} failed and its previous version could not be moved back: it is {previous}"
            ) from error
        raise
    shutil.rmtree(retired)


# ---------------------------------------------------------------------------------------------------------------------
# Model card

# Hub metadata of every converted folder; `base_model` and `license` come from the command line.
MODEL_CARD_TAGS = ["dynamic-llava", "llava", "vision-language", "token-pruning", "kv-cache-compression", "custom_code"]


def model_card_template() -> str:
    """The MODEL_CARD.md template shipped inside the package (a copy of the repository's MODEL_CARD.md)."""
    return resources.files("dynamic_llava_hf").joinpath("MODEL_CARD.md").read_text(encoding="utf-8")


def model_card(
    config: DynamicLlavaConfig,
    dst: str,
    source_description: str,
    command: str,
    base_model: str | None,
    license: str | None,
    model_id: str | None,
    processor_written: bool,
    untrained_predictors: bool,
) -> ModelCard:
    """The converted folder's README.md: Hub metadata and the MODEL_CARD.md template filled in for `config`."""
    from .. import __version__

    tokens = config.image_seq_length
    kept = int(tokens * config.vision_keep_rate)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license or "other",
        base_model=base_model,
        tags=MODEL_CARD_TAGS,
    )
    return ModelCard.from_template(
        card_data,
        template_str=model_card_template(),
        model_name=os.path.basename(os.path.abspath(dst)),
        source_description=source_description,
        conversion_command=command,
        untrained_predictors=untrained_predictors,
        predictors_trained=config.predictors_trained,
        processor_written=processor_written,
        sparse_settings=[
            ("sparse_layer", config.sparse_layer, "decoder layer at whose input tokens are pruned"),
            ("use_vision_predictor", config.use_vision_predictor, "prune image tokens at prefill"),
            ("vision_keep_rate", config.vision_keep_rate, f"{kept} of {tokens} image tokens kept per image"),
            (
                "use_output_text_predictor",
                config.use_output_text_predictor,
                "drop generated tokens' KV in layers >= sparse_layer",
            ),
            ("use_instruct_predictor", config.use_instruct_predictor, "prune the prompt text after the image"),
            (
                "predictors_trained",
                config.predictors_trained,
                "the learned predictors run without sparsity= (false: only when asked for)",
            ),
        ],
        image_size=config.vision_config.image_size,
        image_tokens=tokens,
        model_id=model_id or dst,
        package_version=__version__,
        transformers_version=transformers.__version__,
    )


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


def write_output(model, dst: str, force: bool, processor, card: ModelCard, progress: bool) -> int:
    """Writes model, processor (an object with `save_pretrained`, or files to copy) and model card; verifies."""
    with staged_folder(dst, force) as staging:
        try:
            write_files(model, staging, processor, card, progress)
        except (OSError, SafetensorError) as error:
            # Disk full, file too large, ...: one line saying what happened and that nothing changed.
            reason = " ".join(str(error).split())
            raise OSError(
                f"Writing the converted folder failed ({reason}); the partial output was removed and "
                f"{os.path.abspath(dst)} is unchanged"
            ) from error
        return verify_saved_weights(model, staging, progress)


def write_files(model, folder: str, processor, card: ModelCard, progress: bool) -> None:
    bars_enabled = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:  # transformers' own "Writing model shards" bar
        transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, max_shard_size="5GB")
    finally:
        if bars_enabled:
            transformers.utils.logging.enable_progress_bar()
    if isinstance(processor, list):
        for path in processor:
            shutil.copy2(path, folder)
    elif processor is not None:
        processor.save_pretrained(folder)
    card.save(os.path.join(folder, "README.md"))


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
