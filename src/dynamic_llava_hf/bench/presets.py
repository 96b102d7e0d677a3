"""The shapes `dynamic-llava bench` measures (`PRESETS`) and the settings of one run (`BenchSettings`)."""

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
)

from ..compiled_prefill_dynamic_llava import uses_cuda_graphs
from ..configuration_dynamic_llava import DynamicLlavaConfig
from ..utils import torch_dtype

# ---------------------------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class BenchPreset:
    """A model shape to benchmark and the prompt it is fed (text tokens around one image)."""

    name: str
    description: str
    text_config: dict
    vision_config: dict
    predictor_config: dict
    image_token_index: int
    text_tokens_before_image: int  # BOS included
    text_tokens_after_image: int
    # Generated tokens per decoding point unless `BenchSettings.new_tokens` says otherwise.
    new_tokens: tuple[int, ...] = (256, 1024)
    cuda_new_tokens: tuple[int, ...] = (256, 1024, 4096)
    # The compiled baseline's graphs: False compiles one static-shape graph per decoding point (the fastest step,
    # what a user with one shape gets); True one dynamic-shape graph for the whole grid (a cheaper smoke test).
    compile_dynamic: bool = False

    def config(self, vision_keep_rate: float | None = None) -> DynamicLlavaConfig:
        vision = CLIPVisionConfig(**self.vision_config)
        overrides = {} if vision_keep_rate is None else {"vision_keep_rate": vision_keep_rate}
        return DynamicLlavaConfig(
            text_config=LlamaConfig(**self.text_config),
            vision_config=vision,
            image_token_index=self.image_token_index,
            image_seq_length=(vision.image_size // vision.patch_size) ** 2,
            **self.predictor_config,
            **overrides,
        )

    @property
    def num_text_tokens(self) -> int:
        return self.text_tokens_before_image + self.text_tokens_after_image


LLAVA_VOCAB = 32064  # llava-1.5-hf: 32000 LLaMA tokens + <image> + <pad>, padded to a multiple of 64
CLIP_VIT_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}


def _predictors(d_model: int, num_heads: int, ffn_dim: int) -> dict:
    """The predictors' config fields; two transformer blocks each, as in the official models."""
    return {
        "predictor_d_model": d_model,
        "predictor_num_heads": num_heads,
        "predictor_ffn_dim": ffn_dim,
        "predictor_num_layers": 2,
    }


OFFICIAL_PREDICTORS = _predictors(512, 8, 2048)


def _llama(hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": 8192,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _cpu_7b_topology() -> BenchPreset:
    hidden_size = 256
    # LLaVA-1.5-7B's structure at width 256: 32 layers, MHA with 7B's head size (128, so 2 heads), SiLU-gated MLP at
    # 7B's intermediate/hidden ratio (11008/4096), real vocabulary. Predictors scaled with the width: d_model =
    # hidden/8 (512 at 4096), ffn = 4 × d_model (2048/512), 2 blocks, and one head of 32 (the official heads are 64
    # wide; narrower heads only slow the kernel down). A cheap CLIP-style tower (2 layers of width 64) still turns a
    # 336 px image into 24 × 24 = 576 patch tokens.
    d_model = hidden_size // 8
    return BenchPreset(
        name="cpu-7b-topology",
        description=(
            "LLaVA-1.5-7B layer structure at width 256 (32 layers, MHA, 2 heads of 128, SiLU-gated MLP 688 = "
            "256 x 11008/4096, vocab 32064), 576 image tokens from a cheap 2-layer CLIP-style tower (width 64, "
            "336 px / 14 px patches), 40 prompt tokens, predictors at d_model 32 / ffn 128 / 1 head"
        ),
        text_config=_llama(hidden_size, hidden_size * 11008 // 4096, 32, 2, LLAVA_VOCAB),
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 336,
            "patch_size": 14,
        },
        predictor_config=_predictors(d_model, 1, 4 * d_model),
        image_token_index=32000,
        text_tokens_before_image=35,
        text_tokens_after_image=5,
    )


def _host_bound() -> BenchPreset:
    # What a batch-1 prefill on a GPU is bound by when it is launch-bound: the host's work (Python, op dispatch,
    # dynamo's guard checks, inductor's generated wrappers), which grows with the depth and the number of calls, not
    # with the width or the sequence. With widths and sequences this small the compute is negligible, so on the CPU
    # wall time is that host work. (At 576 image tokens the CPU's attention kernels would dominate.)
    return BenchPreset(
        name="host-bound",
        description=(
            "LLaVA-1.5-7B's depth at negligible width and length (32 LLaMA layers of width 64, vocab 32064; 24 CLIP "
            "layers of width 32; 64 image tokens from 112 px), 40 prompt tokens: a prefill's time is its host work"
        ),
        text_config=_llama(64, 172, 32, 1, LLAVA_VOCAB),
        vision_config={
            **CLIP_VIT_L_336,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 1,
            "image_size": 112,
        },
        predictor_config=_predictors(16, 1, 32),
        image_token_index=32000,
        text_tokens_before_image=35,
        text_tokens_after_image=5,
    )


PRESETS: dict[str, BenchPreset] = {
    "tiny": BenchPreset(
        name="tiny",
        description="4-layer width-64 model, 36 image tokens (84 px / 14 px), 10 prompt tokens: a smoke test",
        text_config=_llama(64, 172, 4, 4, 1000),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 84,
            "patch_size": 14,
        },
        predictor_config=_predictors(16, 2, 64),
        image_token_index=999,
        text_tokens_before_image=6,
        text_tokens_after_image=4,
        # A smoke test of about a minute on one CPU core; 1K-token generations would take most of it.
        new_tokens=(64, 256),
        cuda_new_tokens=(64, 256),
        compile_dynamic=True,  # one compilation instead of six keeps the smoke test near a minute
    ),
    "cpu-7b-topology": _cpu_7b_topology(),
    "host-bound": _host_bound(),
    "llava-1.5-7b": BenchPreset(
        name="llava-1.5-7b",
        description="LLaVA-1.5-7B shapes (Vicuna-7B + CLIP ViT-L/14-336), random weights; needs a GPU (14 GB bf16)",
        text_config=_llama(4096, 11008, 32, 32, LLAVA_VOCAB),
        vision_config=CLIP_VIT_L_336,
        predictor_config=OFFICIAL_PREDICTORS,
        image_token_index=32000,
        text_tokens_before_image=35,
        text_tokens_after_image=5,
    ),
    "llava-1.5-13b": BenchPreset(
        name="llava-1.5-13b",
        description="LLaVA-1.5-13B shapes (Vicuna-13B + CLIP ViT-L/14-336), random weights; needs a GPU (27 GB bf16)",
        text_config=_llama(5120, 13824, 40, 40, LLAVA_VOCAB),
        vision_config=CLIP_VIT_L_336,
        predictor_config=OFFICIAL_PREDICTORS,
        image_token_index=32000,
        text_tokens_before_image=35,
        text_tokens_after_image=5,
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Settings

EXTRA_BASELINES = ("static", "compiled")
# How the output-text predictor decides during timed decoding (see `BenchSettings.output_keep_pattern`).
OUTPUT_KEEP_PATTERNS = ("calibrated", "alternate")


@dataclass
class BenchSettings:
    """What `run_benchmark` measures. Empty batch-size/keep-rate tuples skip that part."""

    preset: str = "tiny"
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # a torch dtype name; None or "auto": bfloat16 on cuda, float32 on cpu
    attn_implementation: str = "sdpa"
    prefill_batch_sizes: tuple[int, ...] = (1, 8)
    decode_batch_sizes: tuple[int, ...] = (1, 8, 32)
    new_tokens: tuple[int, ...] | None = None  # None: the preset's (`new_tokens`, `cuda_new_tokens` on cuda)
    repeats: int = 5
    warmup: int = 1
    decode_repeats: int = 1
    vision_keep_rate: float | None = None  # None: the config default (0.2)
    output_keep_rate: float = 0.5
    # "calibrated": the random output-text predictor, its bias shifted to keep `output_keep_rate` of all generated
    # tokens. A random model repeats one token per row, so it keeps nearly all of some rows and nearly none of others,
    # and the cache pads every row to the longest. "alternate": a fixed rule replaces the predictor and keeps every
    # other generated token of every row (0.5 per row by construction, as a trained predictor keeps about half of
    # each reply); reported as such.
    output_keep_pattern: str = "calibrated"
    sweep_keep_rates: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    sweep_batch_size: int = 1
    seed: int = 0
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    # transformers' Llava is always measured with its default DynamicCache; these add its StaticCache ("static") and
    # the StaticCache with generate's compiled decoding step ("compiled", `compile_config`).
    baselines: tuple[str, ...] = ("static", "compiled")
    # Dynamic-LLaVA is always measured with its default (dynamic) cache; these add its fixed-capacity cache
    # (cache_implementation="static", "static") and that cache with the compiled decoding step ("compiled").
    our_modes: tuple[str, ...] = ("static", "compiled")
    compile_backend: str = "inductor"
    compile_dynamic: bool | None = None  # None: the preset's choice
    # Our prefill with its decoder-layer loops, vision tower and image predictor compiled
    # (`model.compile_prefill(backend=compile_backend)`); the baseline's prefill stays eager, as generate() runs it.
    compile_prefill: bool = False
    # torch.compile mode of that prefill (None: inductor's default); "reduce-overhead" adds CUDA graphs on a GPU.
    compile_prefill_mode: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        torch_dtype(self.dtype)  # raises a ValueError naming an unknown dtype
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        for name in ("prefill_batch_sizes", "decode_batch_sizes", "new_tokens"):
            values = getattr(self, name) or ()
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values}")
        if any(v < 2 for v in self.new_tokens or ()):
            raise ValueError(
                f"new_tokens must be >= 2 (the first token comes from the prefill), got {self.new_tokens}"
            )
        for name in ("repeats", "decode_repeats", "sweep_batch_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("baselines", "our_modes"):
            unknown = set(getattr(self, name)) - set(EXTRA_BASELINES)
            if unknown:
                raise ValueError(f"Unknown {name} {sorted(unknown)}; choose from {list(EXTRA_BASELINES)}")
        if self.output_keep_pattern not in OUTPUT_KEEP_PATTERNS:
            raise ValueError(
                f"output_keep_pattern must be one of {list(OUTPUT_KEEP_PATTERNS)}, got {self.output_keep_pattern!r}"
            )
        if self.output_keep_pattern == "alternate" and self.output_keep_rate != 0.5:
            raise ValueError(
                f"output_keep_pattern='alternate' keeps 0.5 of each row; output_keep_rate {self.output_keep_rate} "
                "applies to the calibrated pattern only"
            )
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.compile_prefill and self.warmup < 1:
            raise ValueError("compile_prefill needs warmup >= 1 (the warm-up compiles; it is not timed)")
        if self.compile_prefill_mode is not None and not self.compile_prefill:
            raise ValueError("compile_prefill_mode applies to compile_prefill, which is off")
        if self.compile_prefill and self.warmup < 2 and uses_cuda_graphs(self.prefill_compile_kwargs()):
            raise ValueError(
                f"compile_prefill_mode {self.compile_prefill_mode!r} records CUDA graphs: it needs warmup >= 2 (the "
                "first call warms up, the second records the graphs; only replays are timed)"
            )
        rates = [self.output_keep_rate, *self.sweep_keep_rates]
        if self.vision_keep_rate is not None:
            rates.append(self.vision_keep_rate)
        if any(not 0.0 < r <= 1.0 for r in rates):
            raise ValueError(f"keep rates must lie in (0, 1], got {rates}")

    def prefill_compile_kwargs(self) -> dict:
        """`model.compile_prefill` keyword arguments."""
        kwargs = {"backend": self.compile_backend}
        if self.compile_prefill_mode is not None:
            kwargs["mode"] = self.compile_prefill_mode
        return kwargs


def resolve_device_and_dtype(settings: BenchSettings) -> tuple[torch.device, torch.dtype]:
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    default = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, torch_dtype(settings.dtype) or default
