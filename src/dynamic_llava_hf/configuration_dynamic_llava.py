"""Configuration of Dynamic-LLaVA: a LLaVA-1.5 configuration plus the sparsification settings of the method."""

from transformers import LlavaConfig, PreTrainedConfig


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
        predictors_trained (`bool`, *optional*, defaults to `True`):
            Whether the learned predictors hold trained weights. `convert llava-hf` writes `False` (its predictors are
            freshly initialised): calls without `sparsity=` then leave the learned predictors out, so the model equals
            the source Llava (a training-free `vision_selector` still prunes). `sparsity=True`, or a `sparsity` dict
            that switches a predictor on, uses them anyway; `DynamicLlavaTrainer` sets it to `True` when training
            starts.
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
    predictors_trained: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_sparsity()

    def __setattr__(self, key, value):
        # Every way a setting enters (the constructor, from_pretrained(..., key=value) overrides, a user mutating
        # model.config) ends in setattr: check and normalise it here, so "false" or None never reaches the model.
        check = FIELD_CHECKS.get(key)
        if check is not None:
            value = check(key, value)
            if key == "sparse_layer" and isinstance(self.__dict__.get("text_config"), PreTrainedConfig):
                check_sparse_layer(value, self.text_config.num_hidden_layers)
        super().__setattr__(key, value)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers applies `from_pretrained` keyword overrides after __post_init__; check the result again.
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config.validate_sparsity()
        return loaded

    def validate_sparsity(self):
        """Raises a `ValueError` naming the first invalid sparsification setting."""
        validate_sparsity_settings(self)


def validate_sparsity_settings(config) -> None:
    """Checks every sparsification field of `config` (a `DynamicLlavaConfig`, possibly mutated since it was built) and
    the combinations of fields; raises a `ValueError` naming the first invalid one."""
    for name, check in FIELD_CHECKS.items():
        check(name, getattr(config, name))
    check_sparse_layer(config.sparse_layer, config.text_config.num_hidden_layers)
    if config.predictor_d_model % 4 != 0:
        raise ValueError(
            "predictor_d_model must be a multiple of 4 (the output MLP halves it twice), "
            f"got {config.predictor_d_model}"
        )
    if config.predictor_d_model % config.predictor_num_heads != 0:
        raise ValueError(
            f"predictor_d_model ({config.predictor_d_model}) must be divisible by predictor_num_heads "
            f"({config.predictor_num_heads})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Field checks: each returns the value normalised to a plain Python bool/int/float/str (so config.json stays valid
# JSON) or raises a ValueError naming the field.


def as_bool(name: str, value) -> bool:
    # Only real booleans: the string "false" is truthy and None falsy, so either would silently flip a predictor.
    value = as_python_scalar(value)
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def as_python_scalar(value):
    """numpy scalars and 0-d arrays/tensors as the Python bool/int/float they hold; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def as_real(value):
    """`value` as a Python int/float if it is a real number (also numpy scalars and 0-d arrays/tensors), else None."""
    value = as_python_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def check_keep_rate(name: str, value) -> float:
    """Keep rates are shares of tokens kept: a number in (0, 1]."""
    number = as_real(value)
    if number is None or not 0.0 < number <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(number)


def check_int(name: str, value, minimum: int) -> int:
    number = as_real(value)
    if not isinstance(number, int) or number < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(number)


def check_non_negative_int(name: str, value) -> int:
    return check_int(name, value, 0)


def check_positive_int(name: str, value) -> int:
    return check_int(name, value, 1)


def check_non_negative_number(name: str, value) -> float:
    number = as_real(value)
    if number is None or not 0 <= number < float("inf"):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(number)


def check_sparse_layer(sparse_layer: int, num_hidden_layers: int) -> None:
    if not 1 <= sparse_layer < num_hidden_layers:
        raise ValueError(
            f"sparse_layer must be in [1, num_hidden_layers) = [1, {num_hidden_layers}) so that at least one layer "
            f"sees the full context and at least one is sparsified, got {sparse_layer}"
        )


# How image tokens are chosen at inference; see `vision_selector` above.
VISION_SELECTORS = ("learned", "random", "fastv")


def check_vision_selector(name: str, value) -> str:
    if not isinstance(value, str) or value not in VISION_SELECTORS:
        raise ValueError(f"{name} must be one of {list(VISION_SELECTORS)}, got {value!r}")
    return value


# The check of every sparsification field (see the class docstring).
FIELD_CHECKS = {
    "sparse_layer": check_positive_int,
    "use_vision_predictor": as_bool,
    "vision_keep_rate": check_keep_rate,
    "vision_selector": check_vision_selector,
    "vision_selector_seed": check_non_negative_int,
    "use_output_text_predictor": as_bool,
    "output_text_keep_rate": check_keep_rate,
    "output_text_len_for_training": check_non_negative_int,
    "use_instruct_predictor": as_bool,
    "instruct_keep_rate": check_keep_rate,
    "instruct_len_for_training": check_non_negative_int,
    "predictor_d_model": check_positive_int,
    "predictor_num_heads": check_positive_int,
    "predictor_ffn_dim": check_positive_int,
    "predictor_num_layers": check_positive_int,
    "mask_loss_weight": check_non_negative_number,
    "predictors_trained": as_bool,
}


__all__ = ["DynamicLlavaConfig"]
