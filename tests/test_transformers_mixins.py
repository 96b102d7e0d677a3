"""transformers' own common model tests (`ModelTesterMixin` and `ConfigTester`, from the source distribution of the
installed release: see `transformers_upstream.py`) run on

- `LlavaForConditionalGeneration` / `LlavaModel` themselves (`TestLlavaBaseline`): the baseline on this machine;
- Dynamic-LLaVA with sparsification off (`TestDynamicLlavaSparsityOff`): everything that passes for Llava must pass;
- Dynamic-LLaVA with every predictor on (`TestDynamicLlavaSparsityOn`): the tests that cannot hold for a model that
  removes tokens would be skipped, each with its reason (`SKIPPED_WITH_SPARSITY`; none is needed).

The three share one tiny configuration, the one of transformers' own Llava model tests (a 2-layer Llama of width 32,
a 2-layer CLIP vision tower on 8x8 images with 2x2 patches: 16 image tokens, then 7 text tokens; 3 rows).
transformers' generation tests (`tests/generation/`) are not in the source distribution and are not run here; see the
module docstring of `transformers_upstream.py`.
"""

import os
import unittest
from unittest import mock

import pytest
import torch
from parameterized import parameterized
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from dynamic_llava_hf import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration, DynamicLlavaModel
from transformers_upstream import UpstreamTestsUnavailable, load_upstream


try:
    upstream = load_upstream()
except UpstreamTestsUnavailable as error:
    if os.environ.get("CI"):
        raise
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

# transformers' tests call the models with the deprecated `past_key_values=` on purpose (test_bc_cache_name_forward):
# the project-wide filter that turns that warning into an error is for our own code only.
pytestmark = pytest.mark.filterwarnings("default:`past_key_values` is deprecated:FutureWarning")

ModelTesterMixin = upstream.modeling.ModelTesterMixin
GenerationTesterMixin = upstream.modeling.GenerationTesterMixin
ConfigTester = upstream.configuration.ConfigTester
floats_tensor = upstream.modeling.floats_tensor
ids_tensor = upstream.modeling.ids_tensor

IMAGE_TOKEN_ID = 0
PAD_TOKEN_ID = 1
TEXT_TOKENS = 7
IMAGE_SIZE, PATCH_SIZE = 8, 2
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16: the "default" strategy drops CLS

# The Dynamic-LLaVA settings of each variant (on top of the shared Llava configuration). The text model has 2 layers,
# so `sparse_layer` can only be 1.
SPARSITY_OFF = dict(
    sparse_layer=1, use_vision_predictor=False, use_output_text_predictor=False, use_instruct_predictor=False
)
SPARSITY_ON = dict(
    sparse_layer=1,
    use_vision_predictor=True,
    vision_keep_rate=0.25,  # 4 of each image's 16 tokens
    use_output_text_predictor=True,
    use_instruct_predictor=True,
    predictor_d_model=16,
    predictor_num_heads=2,
    predictor_ffn_dim=32,
    predictor_num_layers=1,
)


class TinyLlavaTester:
    """Builds the tiny configuration and inputs (the model tester that `ModelTesterMixin` expects)."""

    batch_size = 3
    is_training = True
    num_image_tokens = IMAGE_TOKENS
    seq_length = IMAGE_TOKENS + TEXT_TOKENS
    encoder_seq_length = seq_length
    num_hidden_layers = 2
    hidden_size = 32
    num_attention_heads = 4
    vocab_size = 99
    pad_token_id = PAD_TOKEN_ID
    image_token_index = IMAGE_TOKEN_ID
    image_size = IMAGE_SIZE

    def __init__(self, parent, config_class=LlavaConfig, sparsity=None):
        self.parent = parent
        self.config_class = config_class
        self.sparsity = sparsity or {}
        self.text_config = dict(
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=37,
            hidden_act="gelu",
            max_position_embeddings=512,
            initializer_range=0.02,
            pad_token_id=PAD_TOKEN_ID,
        )
        self.vision_config = dict(
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            num_channels=3,
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            dropout=0.1,
            attention_dropout=0.1,
            initializer_range=0.02,
        )

    def get_config(self):
        return self.config_class(
            text_config=LlamaConfig(**{k: v for k, v in self.text_config.items() if k != "model_type"}).to_dict(),
            vision_config=CLIPVisionConfig(**self.vision_config).to_dict(),
            image_token_index=IMAGE_TOKEN_ID,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            image_seq_length=IMAGE_TOKENS,
            **self.sparsity,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE])
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[input_ids == IMAGE_TOKEN_ID] = PAD_TOKEN_ID
        input_ids[:, :IMAGE_TOKENS] = IMAGE_TOKEN_ID  # one image first in every row
        attention_mask = torch.ones_like(input_ids)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


# Skipped for every class here: a stand-in replaces what the test checks.
SKIPPED_FOR_ALL = {}
if "generation.test_utils" in upstream.stand_ins:
    SKIPPED_FOR_ALL["test_generation_tester_mixin_inheritance"] = (
        "transformers' GenerationTesterMixin (tests/generation/) is not in its source distribution; a stand-in class "
        "takes its place, so the check would check nothing"
    )

# Skipped for Dynamic-LLaVA with sparsification on. None is needed: with 4 of each image's 16 tokens kept, the instruct
# predictor removing prompt text and the output-text predictor gating the cache, every common model test that passes
# for Llava passes (outputs are compared between two runs of the same pruned model, e.g. eager against sdpa, batched
# against single rows, saved against reloaded; hidden states, logits and attention weights keep Llava's shapes, with
# zeros at removed positions). The tests that compare against an unpruned run, or need a static or quantized cache,
# are transformers' generation tests, which are not run here.
SKIPPED_WITH_SPARSITY = {}


def with_skips(skips: dict):
    """Class decorator: replaces each named test by a skipped one with its reason."""

    def decorate(cls):
        for name, reason in skips.items():
            assert callable(getattr(cls, name, None)), f"{cls.__name__} has no {name} to skip"

            def skipped(self, reason=reason):
                self.skipTest(reason)

            skipped.__name__ = name
            setattr(cls, name, skipped)
        return cls

    return decorate


class CommonTests(ModelTesterMixin, GenerationTesterMixin):
    config_class = LlavaConfig
    sparsity = None
    _is_composite = True
    # transformers skips the three gradient-checkpointing tests for Llava ("does not compute gradients properly with
    # gradient checkpointing"): what fails is their check that every parameter gets a gradient, since the vision
    # tower's post_layernorm is not on the path of `vision_feature_layer` (hidden states before it). They run here
    # without that check, which still compares the parameters that get gradients with and without checkpointing
    # (they found the reentrant-checkpointing failure of training with predictors on).
    test_all_params_have_gradient = False

    def setUp(self):
        # transformers' `ids_tensor` / `floats_tensor` draw from an unseeded module-level generator: seed it, so that
        # a run here and one in CI see the same inputs (the project's conftest seeds torch the same way).
        upstream.modeling.global_rng.seed(0)
        self.model_tester = TinyLlavaTester(self, self.config_class, self.sparsity)
        self.config_tester = ConfigTester(
            self,
            config_class=self.config_class,
            has_text_modality=False,
            common_properties=["image_token_index", "vision_feature_layer", "image_seq_length"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    # The two checks below are this project's own, of what transformers' Llava test class adds to the mixins
    # (its tests/models/llava/ is not in the source distribution).

    def test_image_count_must_match_placeholders(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        one_row = inputs["input_ids"][:1]
        for model_class in self.all_model_classes:
            model = model_class(config).to(torch_device).eval()
            with torch.no_grad():
                model(**inputs)
                with self.assertRaisesRegex(ValueError, "Image features and image tokens do not match"):
                    model(
                        **{**inputs, "pixel_values": inputs["pixel_values"][-1:]}
                    )  # one image, three rows of placeholders
                with self.assertRaisesRegex(ValueError, "Image features and image tokens do not match"):
                    model(input_ids=one_row.repeat(2, 1), pixel_values=inputs["pixel_values"][:1])
                model(input_ids=one_row.repeat(2, 1), pixel_values=inputs["pixel_values"][:1].repeat(2, 1, 1, 1))

    @parameterized.expand([(-1,), ([-1],), ([-1, -2],)])
    def test_vision_feature_layer_int_or_list(self, vision_feature_layer):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.vision_feature_layer = vision_feature_layer
        layers = 1 if isinstance(vision_feature_layer, int) else len(vision_feature_layer)
        for model_class in self.all_model_classes:
            model = model_class(config).to(torch_device).eval()
            base = getattr(model, "model", model)
            self.assertEqual(
                base.multi_modal_projector.linear_1.in_features, layers * config.vision_config.hidden_size
            )
            with torch.no_grad():
                model(**inputs)


@with_skips(SKIPPED_FOR_ALL)
class TestLlavaBaseline(CommonTests, unittest.TestCase):
    all_model_classes = (LlavaModel, LlavaForConditionalGeneration)


# Two common tests that pass for Llava skip themselves for Dynamic-LLaVA (off and on), by their own rules:
# - test_bc_cache_name_forward ("Not returning cache or non standard Cache"): it runs only for models whose cache is
#   exactly a DynamicCache; ours returns a DynamicLlavaCache (a different set of tokens per layer and row). That both
#   names are accepted, and that our own code uses the new one, is checked in test_transformers_compat.py.
# - test_reverse_loading_mapping ("Only PrefixChange conversions found"): transformers gives custom code no checkpoint
#   key conversion (Llava's legacy-layout renaming), and this model saves its in-memory names; legacy llava-hf
#   checkpoints go through `dynamic-llava convert llava-hf` (test_convert.py).


class DynamicLlavaTests(CommonTests):
    all_model_classes = (DynamicLlavaModel, DynamicLlavaForConditionalGeneration)
    config_class = DynamicLlavaConfig
    # transformers runs this test only for models added from 2023 on, by the copyright year at the top of the
    # configuration file (Llava's says 2023; ours has no such line): run it here.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        super().setUp()
        # Several common tests pick the classes they apply to by name, from transformers' lists of its own models
        # (`modeling_auto.*_MAPPING_NAMES`: the base model, the image-text-to-text head, ...). A custom model is in
        # none of them, so these tests would skip or treat our classes differently from Llava's. List our two
        # classes, for the duration of the test, in every list that names Llava's.
        ours = {"LlavaModel": "DynamicLlavaModel", "LlavaForConditionalGeneration": self.all_model_classes[1].__name__}
        for name in dir(modeling_auto):
            names = getattr(modeling_auto, name)
            if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES") and names.get("llava") in ours:
                patcher = mock.patch.dict(names, {"dynamic_llava": ours[names["llava"]]})
                patcher.start()
                self.addCleanup(patcher.stop)


@with_skips(SKIPPED_FOR_ALL)
class TestDynamicLlavaSparsityOff(DynamicLlavaTests, unittest.TestCase):
    sparsity = SPARSITY_OFF


@with_skips({**SKIPPED_FOR_ALL, **SKIPPED_WITH_SPARSITY})
class TestDynamicLlavaSparsityOn(DynamicLlavaTests, unittest.TestCase):
    sparsity = SPARSITY_ON
