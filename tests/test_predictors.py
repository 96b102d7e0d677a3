"""The predictors must have exactly the official architecture: names, shapes, activations, LayerNorm eps."""

import pytest
import torch
from torch import nn

from dynamic_llava_hf.modeling_dynamic_llava import DynamicLlavaImagePredictor, DynamicLlavaTextPredictor
from tiny_models import tiny_model
from tolerances import FP32_SAME_MATH, FP32_SAME_OP


def image_predictor(hidden_size):
    return DynamicLlavaImagePredictor(hidden_size, d_model=512, num_heads=8, ffn_dim=2048, num_layers=2)


@pytest.mark.parametrize("hidden_size, expected", [(4096, 8_572_034), (5120, 9_098_370)])
def test_image_predictor_parameter_count(hidden_size, expected):
    assert sum(p.numel() for p in image_predictor(hidden_size).parameters()) == expected


@pytest.mark.parametrize("hidden_size, expected", [(4096, 2_270_338), (5120, 2_796_674)])
def test_text_predictor_parameter_count(hidden_size, expected):
    predictor = DynamicLlavaTextPredictor(hidden_size, d_model=512)
    assert sum(p.numel() for p in predictor.parameters()) == expected


def test_image_predictor_keys_and_shapes_match_the_official_checkpoint():
    hidden = 4096
    shapes = {name: tuple(p.shape) for name, p in image_predictor(hidden).state_dict().items()}
    expected = {
        "down_mlp.0.weight": (hidden,),
        "down_mlp.0.bias": (hidden,),
        "down_mlp.1.weight": (512, hidden),
        "down_mlp.1.bias": (512,),
        "output_mlp.0.weight": (256, 512),
        "output_mlp.0.bias": (256,),
        "output_mlp.2.weight": (128, 256),
        "output_mlp.2.bias": (128,),
        "output_mlp.4.weight": (2, 128),
        "output_mlp.4.bias": (2,),
    }
    for block in range(2):
        prefix = f"transformer.{block}."
        expected.update(
            {
                prefix + "norm1.weight": (512,),
                prefix + "norm1.bias": (512,),
                prefix + "attn.qkv.weight": (1536, 512),
                prefix + "attn.proj.weight": (512, 512),
                prefix + "attn.proj.bias": (512,),
                prefix + "norm2.weight": (512,),
                prefix + "norm2.bias": (512,),
                prefix + "mlp.fc1.weight": (2048, 512),
                prefix + "mlp.fc1.bias": (2048,),
                prefix + "mlp.fc2.weight": (512, 2048),
                prefix + "mlp.fc2.bias": (512,),
            }
        )
    assert shapes == expected


def test_text_predictor_keys_and_shapes():
    shapes = {name: tuple(p.shape) for name, p in DynamicLlavaTextPredictor(4096, 512).state_dict().items()}
    assert shapes == {
        "output_mlp.0.weight": (4096,),
        "output_mlp.0.bias": (4096,),
        "output_mlp.1.weight": (512, 4096),
        "output_mlp.1.bias": (512,),
        "output_mlp.3.weight": (256, 512),
        "output_mlp.3.bias": (256,),
        "output_mlp.5.weight": (128, 256),
        "output_mlp.5.bias": (128,),
        "output_mlp.7.weight": (2, 128),
        "output_mlp.7.bias": (2,),
    }


def test_activations_are_exact_gelu_and_layernorm_eps_is_default():
    for predictor in (image_predictor(64), DynamicLlavaTextPredictor(64, 512)):
        for module in predictor.modules():
            if isinstance(module, nn.GELU):
                assert module.approximate == "none"
            if isinstance(module, nn.LayerNorm):
                assert module.eps == 1e-5
        assert any(isinstance(m, nn.GELU) for m in predictor.modules())


def test_image_predictor_matches_a_hand_written_forward():
    torch.manual_seed(0)
    predictor = DynamicLlavaImagePredictor(12, d_model=16, num_heads=2, ffn_dim=32, num_layers=2).eval()
    x = torch.randn(3, 7, 12)

    z = predictor.down_mlp(x)
    for block in predictor.transformer:
        normed = block.norm1(z)
        q, k, v = block.attn.qkv(normed).chunk(3, dim=-1)
        heads = lambda t: t.view(3, 7, 2, 8).transpose(1, 2)  # noqa: E731
        weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 8**0.5, dim=-1)
        z = z + block.attn.proj((weights @ heads(v)).transpose(1, 2).reshape(3, 7, 16))
        z = z + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm2(z))))
    z = torch.cat([z[..., :8], z[..., 8:].mean(1, keepdim=True).expand(-1, 7, -1)], dim=-1)
    expected = predictor.output_mlp(z)
    torch.testing.assert_close(predictor(x), expected, atol=FP32_SAME_OP, rtol=FP32_SAME_MATH)
    # An all-ones training policy changes nothing.
    torch.testing.assert_close(predictor(x, torch.ones(3, 7, 1)), expected, atol=FP32_SAME_OP, rtol=FP32_SAME_MATH)


def test_model_state_dict_uses_official_predictor_prefixes():
    model = tiny_model(use_instruct_predictor=True)
    keys = model.state_dict().keys()
    assert "model.image_score_predictor.transformer.0.attn.qkv.weight" in keys
    assert "model.output_text_score_predictor.output_mlp.7.bias" in keys
    assert "model.instruct_score_predictor.output_mlp.0.weight" in keys
    assert not any(
        "predictor" in key for key in tiny_model(use_instruct_predictor=False).state_dict() if "instruct" in key
    )
