import pytest
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
