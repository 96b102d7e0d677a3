"""Configuration of Dynamic-LLaVA: a LLaVA-1.5 configuration plus the sparsification settings of the method."""

from transformers import LlavaConfig


class DynamicLlavaConfig(LlavaConfig):
    r"""
    Configuration of [`DynamicLlavaForConditionalGeneration`].

    All fields of [`~transformers.LlavaConfig`] plus the Dynamic-LLaVA sparsification settings. The field names follow
    the `sparse_config` of the official implementation, so official checkpoints convert one to one; the defaults are
    those of its released 7B/13B training scripts.

    Args:
        sparse_layer (`int`, *optional*, defaults to 2):
            Index of the decoder layer at whose input the keep/drop decisions are taken. Layers below it always see the
            whole context; the decisions apply to this layer and every later one.
        use_vision_predictor (`bool`, *optional*, defaults to `True`):
            Build the image predictor and prune image tokens at prefill.
        vision_keep_rate (`float`, *optional*, defaults to 0.2):
            Share of each image's tokens kept at prefill: `floor(num_image_tokens * vision_keep_rate)` (115 of 576).
        vision_selector (`str`, *optional*, defaults to `"learned"`):
            How the kept image tokens are chosen at inference: `"learned"` (top-k of the image predictor, the method),
            `"random"` (seeded uniform random subset) or `"fastv"` (training-free: top-k by the attention the image
            tokens receive at `sparse_layer`, FastV-style). `"random"` and `"fastv"` need no image predictor; they are
            baselines to compare the learned predictor against.
        vision_selector_seed (`int`, *optional*, defaults to 0):
            Seed of the `"random"` selector.
        use_output_text_predictor (`bool`, *optional*, defaults to `True`):
            Build the output-text predictor and gate the KV cache of generated tokens (keep iff logit_keep >
            logit_drop) in layers `>= sparse_layer`.
        output_text_keep_rate (`float`, *optional*, defaults to 0.5):
            Training target of the output-text keep ratio (not used at inference).
        output_text_len_for_training (`int`, *optional*, defaults to 50):
            Answers shorter than this are not sparsified in training.
        use_instruct_predictor (`bool`, *optional*, defaults to `False`):
            Build the instruct predictor and prune prompt text that follows the image.
        instruct_keep_rate (`float`, *optional*, defaults to 0.7):
            Training target of the instruction keep ratio.
        instruct_len_for_training (`int`, *optional*, defaults to 25):
            Instructions shorter than this are not sparsified in training.
        predictor_d_model (`int`, *optional*, defaults to 512):
            Width of the predictors (official `d_model`).
        predictor_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the image predictor's transformer blocks (official `nhead`).
        predictor_ffn_dim (`int`, *optional*, defaults to 2048):
            Feed-forward width of the image predictor's transformer blocks (official `dim_feedforward`).
        predictor_num_layers (`int`, *optional*, defaults to 2):
            Transformer blocks in the image predictor (official `num_layers`).
        mask_loss_weight (`float`, *optional*, defaults to 100.0):
            Weight of the keep-rate losses in training.
    """

    model_type = "dynamic_llava"

    sparse_layer: int = 2
    use_vision_predictor: bool = True
    vision_keep_rate: float = 0.2
    vision_selector: str = "learned"
    vision_selector_seed: int = 0
    use_output_text_predictor: bool = True
    output_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 50
    use_instruct_predictor: bool = False
    instruct_keep_rate: float = 0.7
    instruct_len_for_training: int = 25
    predictor_d_model: int = 512
    predictor_num_heads: int = 8
    predictor_ffn_dim: int = 2048
    predictor_num_layers: int = 2
    mask_loss_weight: float = 100.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_sparsity()

    def validate_sparsity(self):
        """Raises a `ValueError` naming the first invalid sparsification setting."""
        num_layers = self.text_config.num_hidden_layers
        if isinstance(self.sparse_layer, bool) or not isinstance(self.sparse_layer, int):
            raise ValueError(f"sparse_layer must be an int, got {self.sparse_layer!r}")
        if not 1 <= self.sparse_layer < num_layers:
            raise ValueError(
                f"sparse_layer must be in [1, num_hidden_layers) = [1, {num_layers}) so that at least one layer sees "
                f"the full context and at least one is sparsified, got {self.sparse_layer}"
            )
        for name in ("vision_keep_rate", "output_text_keep_rate", "instruct_keep_rate"):
            check_keep_rate(name, getattr(self, name))
        check_vision_selector(self.vision_selector)
        check_non_negative_int("vision_selector_seed", self.vision_selector_seed)
        for name in ("output_text_len_for_training", "instruct_len_for_training"):
            check_non_negative_int(name, getattr(self, name))
        for name in ("predictor_d_model", "predictor_num_heads", "predictor_ffn_dim", "predictor_num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.predictor_d_model % 4 != 0:
            raise ValueError(
                "predictor_d_model must be a multiple of 4 (the output MLP halves it twice), "
                f"got {self.predictor_d_model}"
            )
        if self.predictor_d_model % self.predictor_num_heads != 0:
            raise ValueError(
                f"predictor_d_model ({self.predictor_d_model}) must be divisible by predictor_num_heads "
                f"({self.predictor_num_heads})"
            )
        if not isinstance(self.mask_loss_weight, (int, float)) or self.mask_loss_weight < 0:
            raise ValueError(f"mask_loss_weight must be a non-negative number, got {self.mask_loss_weight!r}")


def check_keep_rate(name: str, value) -> None:
    """Keep rates are shares of tokens kept: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")



# How image tokens are chosen at inference; see `vision_selector` above.
VISION_SELECTORS = ("learned", "random", "fastv")


def check_vision_selector(value) -> None:
    if not isinstance(value, str) or value not in VISION_SELECTORS:
        raise ValueError(f"vision_selector must be one of {list(VISION_SELECTORS)}, got {value!r}")


def check_non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


__all__ = ["DynamicLlavaConfig"]
