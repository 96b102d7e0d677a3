"""The demo model: a small LLaVA-1.5-architecture Dynamic-LLaVA trained here on the synthetic task (`synthetic.py`).

This module builds its pieces (tokenizer, processor, configuration) and assembles the shipped model into a complete,
self-contained folder (`demo_model_path()`). The same processor code (`build_processor`: vicuna_v1 chat template,
`<image>`/`<pad>`, pad-to-square CLIP preprocessing) serves converted 7B checkpoints, so the demo exercises exactly
the user-facing path of a real model.
"""

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from .configuration_dynamic_llava import DynamicLlavaConfig
from .pretrained_dynamic_llava import REMOTE_CODE_AUTO_MAP, REMOTE_CODE_FILES
from .processing import VICUNA_V1_SYSTEM_MESSAGE, add_llava_special_tokens, build_processor, padded_vocab_size
from .synthetic import IMAGE_SIZE, PATCH_SIZE, corpus_texts


# Package data: the trained weights, configuration and processor files (no code: see `demo_model_path`).
DEMO_PACKAGE_DATA = "demo_model_files"
BPE_VOCAB_SIZE = 1000  # an upper bound: the task's text is fully merged into ~490 tokens long before it


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and processor


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes; the task's words are single tokens) trained on the task's text and
    the vicuna_v1 prompt; BOS is prepended, `</s>` ends answers. Deterministic: the same corpus, the same merges."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    prompt_text = [VICUNA_V1_SYSTEM_MESSAGE + " USER: ", " ASSISTANT:", " ASSISTANT: ", "USER:"] * 50
    tokenizer.train_from_iterator(prompt_text + corpus_texts(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    add_llava_special_tokens(wrapped)
    return wrapped


def build_demo_processor():
    """The LLaVA-1.5 processor at the task's resolution: 96 px, 16 px patches -> 36 image tokens."""
    return build_processor(build_tokenizer(), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


# Model sizes: the shipped one, and a tiny one for smoke tests of the training command.
SIZES = {
    "default": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4},
        "text": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 6, "num_attention_heads": 6},
        "predictor": {"predictor_d_model": 128, "predictor_num_heads": 4, "predictor_ffn_dim": 256},
    },
    "tiny": {
        "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "predictor": {"predictor_d_model": 16, "predictor_num_heads": 2, "predictor_ffn_dim": 32},
    },
}


def demo_config(tokenizer, size: str = "default", **overrides) -> DynamicLlavaConfig:
    """LLaVA-1.5's architecture at a small size (~4M parameters): CLIP-style ViT, 2-layer GELU projector, Llama.

    Defaults are stage 1's: no predictors (plain LLaVA). Stage 2 passes the Dynamic-LLaVA settings as `overrides`.
    """
    if size not in SIZES:
        raise ValueError(f"Unknown demo model size {size!r}; valid sizes are {sorted(SIZES)}")
    dims = SIZES[size]
    vision = CLIPVisionConfig(
        **dims["vision"], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=dims["vision"]["hidden_size"]
    )
    text = LlamaConfig(
        **dims["text"],
        num_key_value_heads=dims["text"]["num_attention_heads"],
        vocab_size=padded_vocab_size(len(tokenizer)),
        max_position_embeddings=512,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    settings = {
        "use_vision_predictor": False,
        "use_output_text_predictor": False,
        "vision_keep_rate": 0.2,
        "output_text_keep_rate": 0.5,
        "output_text_len_for_training": 20,  # descriptions are 30-60 tokens, short answers 2-4
        "sparse_layer": 1,  # 1 of 6 layers sees everything (the paper: 2 of 32)
        "predictor_num_layers": 2,
        **dims["predictor"],
        **overrides,
    }
    return DynamicLlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )


def demo_generation_config(config: DynamicLlavaConfig):
    """Greedy, long enough for a description (30-60 tokens), never generating `<image>` or `<pad>`."""
    from transformers import GenerationConfig

    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        max_new_tokens=96,
        do_sample=False,
        suppress_tokens=[config.image_token_id, text.pad_token_id],
    )


# ---------------------------------------------------------------------------------------------------------------------
# The shipped model


def packaged_files() -> dict[str, Path]:
    """The demo model's files inside the installed package (weights, configuration, processor, model card)."""
    folder = resources.files(__package__) / DEMO_PACKAGE_DATA
    if not folder.is_dir():
        raise FileNotFoundError(
            f"The demo model is missing from this installation ({folder}); reinstall dynamic-llava-hf or train one "
            "with `dynamic-llava train-demo --out DIR`"
        )
    return {entry.name: Path(str(entry)) for entry in folder.iterdir() if entry.is_file()}


def code_files() -> dict[str, Path]:
    package = resources.files(__package__)
    return {name: Path(str(package / name)) for name in REMOTE_CODE_FILES}


def files_digest(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HOME

    return Path(os.environ.get("DYNAMIC_LLAVA_CACHE", os.path.join(HF_HOME, "dynamic_llava_hf")))


def demo_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A complete, self-contained folder of the demo model, ready for `from_pretrained`.

    The package ships the weights, configuration and processor; this adds the remote-code files of the installed
    package and the full `auto_map`, so the folder also loads with `trust_remote_code=True` where the package is not
    installed. The folder is assembled once per content (its name holds a digest of weights and code) under
    `cache_dir` (default: `$DYNAMIC_LLAVA_CACHE`, else `$HF_HOME/dynamic_llava_hf`), written to a temporary folder and
    moved into place, so concurrent calls and interrupted ones never leave a half-written folder.
    """
    files = {**packaged_files(), **code_files()}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"demo-model-{files_digest(files)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=root))
    try:
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        config = json.loads((staging / "config.json").read_text())
        config["auto_map"] = {**config.get("auto_map", {}), **REMOTE_CODE_AUTO_MAP}
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent call that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def package_trained_model(trained: str | os.PathLike, destination: str | os.PathLike, force: bool = False) -> Path:
    """Copies a `train-demo` output into the package-data layout: everything but the remote-code files (which
    `demo_model_path` takes from the installed package, so they cannot go stale) and the stage checkpoints."""
    trained, destination = Path(trained), Path(destination)
    if destination.exists() and any(destination.iterdir()) and not force:
        raise FileExistsError(f"{destination} is not empty; pass force=True to replace its files")
    destination.mkdir(parents=True, exist_ok=True)
    for entry in trained.iterdir():
        if entry.is_file() and entry.suffix != ".py":
            shutil.copyfile(entry, destination / entry.name)
    return destination
