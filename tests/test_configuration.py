import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from dynamic_llava_hf import DynamicLlavaConfig


def test_defaults_follow_the_official_scripts():
    config = DynamicLlavaConfig()
    assert config.model_type == "dynamic_llava"
    assert (config.sparse_layer, config.vision_keep_rate, config.output_text_keep_rate) == (2, 0.2, 0.5)
    assert config.use_vision_predictor and config.use_output_text_predictor and not config.use_instruct_predictor
    assert (config.predictor_d_model, config.predictor_num_heads, config.predictor_ffn_dim) == (512, 8, 2048)
    assert config.predictor_num_layers == 2 and config.mask_loss_weight == 100.0
    assert (config.output_text_len_for_training, config.instruct_keep_rate, config.instruct_len_for_training) == (
        50,
        0.7,
        25,
    )


def test_round_trip_keeps_sparsity_fields(tmp_path):
    config = DynamicLlavaConfig(vision_keep_rate=0.3, sparse_layer=3, use_instruct_predictor=True)
    config.save_pretrained(tmp_path)
    loaded = DynamicLlavaConfig.from_pretrained(tmp_path)
    assert (loaded.vision_keep_rate, loaded.sparse_layer, loaded.use_instruct_predictor) == (0.3, 3, True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_keep_rate": 0}, "vision_keep_rate"),
        ({"vision_keep_rate": 1.5}, "vision_keep_rate"),
        ({"output_text_keep_rate": -0.1}, "output_text_keep_rate"),
        ({"instruct_keep_rate": 2}, "instruct_keep_rate"),
        ({"sparse_layer": 0}, "sparse_layer"),
        ({"sparse_layer": 4}, "sparse_layer"),
        ({"sparse_layer": 7}, "sparse_layer"),
        ({"predictor_d_model": 30}, "predictor_d_model"),
        ({"predictor_d_model": 16, "predictor_num_heads": 3}, "predictor_num_heads"),
        ({"output_text_len_for_training": -1}, "output_text_len_for_training"),
        ({"mask_loss_weight": -1.0}, "mask_loss_weight"),
    ],
)
def test_invalid_values_raise_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        DynamicLlavaConfig(text_config=LlamaConfig(num_hidden_layers=4), **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Settings are checked wherever they enter (issue #13, item 1)

BAD_BOOLEANS = ["false", "no", "True", None, 0, 1]


def small_config(**overrides):
    return DynamicLlavaConfig(text_config=LlamaConfig(num_hidden_layers=4), **overrides)


def test_every_sparsity_field_has_a_check():
    import dataclasses

    from dynamic_llava_hf.configuration_dynamic_llava import FIELD_CHECKS

    own = {
        field.name
        for field in dataclasses.fields(DynamicLlavaConfig)
        if field.name in DynamicLlavaConfig.__annotations__
    }
    assert own == set(FIELD_CHECKS)


@pytest.mark.parametrize("value", BAD_BOOLEANS)
@pytest.mark.parametrize("name", ["use_vision_predictor", "use_output_text_predictor", "use_instruct_predictor"])
def test_booleans_must_be_booleans(name, value):
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        small_config(**{name: value})


def test_numpy_and_tensor_booleans_are_booleans():
    config = small_config(use_vision_predictor=np.False_, use_instruct_predictor=torch.tensor(True))
    assert config.use_vision_predictor is False and config.use_instruct_predictor is True


@pytest.mark.parametrize(
    "value",
    [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.bfloat16), np.array(0.5)],
)
def test_rates_accept_any_real_number_type_and_store_a_float(value, tmp_path):
    config = small_config(vision_keep_rate=value, output_text_keep_rate=value, mask_loss_weight=value)
    assert type(config.vision_keep_rate) is float and config.vision_keep_rate == 0.5
    assert type(config.mask_loss_weight) is float
    config.save_pretrained(tmp_path)  # plain JSON
    assert DynamicLlavaConfig.from_pretrained(tmp_path).output_text_keep_rate == 0.5


@pytest.mark.parametrize("value", [float("nan"), "0.5", torch.tensor([0.5]), np.True_, complex(0.5, 0)])
def test_rates_reject_what_is_not_a_real_number_in_range(value):
    with pytest.raises(ValueError, match="vision_keep_rate must be a number in"):
        small_config(vision_keep_rate=value)


def test_integer_fields_accept_numpy_integers():
    config = small_config(sparse_layer=np.int64(3), predictor_num_layers=torch.tensor(1))
    assert type(config.sparse_layer) is int and config.sparse_layer == 3 and config.predictor_num_layers == 1
    with pytest.raises(ValueError, match="sparse_layer must be a positive int"):
        small_config(sparse_layer=2.0)


@pytest.mark.parametrize("sparse_layer", [-1, 0, 4, 99])
def test_from_pretrained_overrides_are_checked(tmp_path, sparse_layer):
    small_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sparse_layer must be"):
        DynamicLlavaConfig.from_pretrained(tmp_path, sparse_layer=sparse_layer)
    with pytest.raises(ValueError, match="use_vision_predictor must be True or False"):
        DynamicLlavaConfig.from_pretrained(tmp_path, use_vision_predictor="no")
    assert DynamicLlavaConfig.from_pretrained(tmp_path, sparse_layer=3).sparse_layer == 3


def test_a_saved_config_with_a_bad_value_does_not_load(tmp_path):
    small_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"sparse_layer": 2', '"sparse_layer": 7'))
    with pytest.raises(ValueError, match=r"sparse_layer must be in \[1, num_hidden_layers\) = \[1, 4\)"):
        DynamicLlavaConfig.from_pretrained(tmp_path)


def test_mutating_a_config_is_checked():
    config = small_config()
    with pytest.raises(ValueError, match="use_vision_predictor must be True or False"):
        config.use_vision_predictor = "false"
    with pytest.raises(ValueError, match="sparse_layer must be in"):
        config.sparse_layer = 4
    config.vision_keep_rate = np.float32(0.25)
    assert type(config.vision_keep_rate) is float
    assert config.use_vision_predictor is True and config.sparse_layer == 2
