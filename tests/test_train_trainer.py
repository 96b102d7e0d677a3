"""`train/trainer.py`: finding the model, the temperature schedule, optimizer groups, what the trainer needs and
marks."""

import math

import pytest
import torch
from tiny_models import tiny_model
from transformers import TrainingArguments

from dynamic_llava_hf.modeling_dynamic_llava import DynamicLlavaCausalLMOutputWithPast
from dynamic_llava_hf.train.trainer import (
    LOGGED_OUTPUTS,
    DynamicLlavaTrainer,
    GumbelTemperatureCallback,
    dynamic_llava_models,
    mark_predictors_trained,
    predictor_parameter_groups,
    set_gumbel_tau,
)


def test_the_model_is_found_inside_wrappers():
    model = tiny_model()
    wrapper = torch.nn.Sequential(torch.nn.ModuleDict({"inner": model}))
    assert dynamic_llava_models(wrapper) == [model.model]
    set_gumbel_tau(wrapper, 0.3)
    assert model.model.gumbel_tau == 0.3
    with pytest.raises(ValueError, match="contains no Dynamic-LLaVA model"):
        set_gumbel_tau(torch.nn.Linear(2, 2), 0.3)


def test_temperature_stays_within_the_schedule():
    callback = GumbelTemperatureCallback(start_tau=2.0, end_tau=0.5)
    assert callback.tau_at(0, max_steps=0) == 2.0  # no step count yet: the start
    assert callback.tau_at(150, max_steps=100) == 0.5  # past the end: the end, not beyond


def test_decay_names_decide_the_groups():
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    groups = predictor_parameter_groups(
        model, learning_rate=1.0, weight_decay=0.1, predictor_lr=2.0, predictor_weight_decay=0.2,
        decay_parameter_names=[],
    )  # fmt: skip
    assert [len(group["params"]) for group in groups][::2] == [0, 0]  # nothing decays
    assert sum(len(group["params"]) for group in groups) == len(names)


def test_the_trainer_needs_its_own_arguments(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="needs DynamicLlavaTrainingArguments"):
        DynamicLlavaTrainer(model=tiny_model(), args=args)


def test_logged_outputs_are_output_fields():
    assert set(LOGGED_OUTPUTS) <= set(DynamicLlavaCausalLMOutputWithPast.__dataclass_fields__)


def test_temperature_callback_follows_the_exponential_schedule():
    callback = GumbelTemperatureCallback(1.0, 0.1)
    assert callback.tau_at(0, 100) == 1.0
    assert math.isclose(callback.tau_at(50, 100), math.sqrt(0.1))
    assert math.isclose(callback.tau_at(100, 100), 0.1)
    model = tiny_model()

    class State:
        global_step, max_steps = 25, 100

    callback.on_step_begin(None, State(), None, model=model)
    assert math.isclose(model.model.gumbel_tau, 0.1**0.25)
    with pytest.raises(ValueError, match="must be > 0"):
        GumbelTemperatureCallback(1.0, 0.0)


def test_parameter_groups_follow_the_official_recipe():
    model = tiny_model()
    model.model.vision_tower.requires_grad_(False)
    groups = predictor_parameter_groups(
        model, learning_rate=5e-6, weight_decay=0.1, predictor_lr=2e-4, predictor_weight_decay=0.01
    )
    names = {id(param): name for name, param in model.named_parameters()}
    group_names = [{names[id(param)] for param in group["params"]} for group in groups]
    assert [(group["lr"], group["weight_decay"]) for group in groups] == [
        (2e-4, 0.01),
        (2e-4, 0.0),
        (5e-6, 0.1),
        (5e-6, 0.0),
    ]
    assert all("predictor" in name for name in group_names[0] | group_names[1])
    assert not any("predictor" in name for name in group_names[2] | group_names[3])
    assert "model.image_score_predictor.transformer.0.attn.qkv.weight" in group_names[0]
    assert "model.image_score_predictor.down_mlp.0.weight" in group_names[1]  # a LayerNorm
    assert "model.image_score_predictor.transformer.0.norm1.weight" in group_names[1]
    assert "model.output_text_score_predictor.output_mlp.1.bias" in group_names[1]
    assert "model.language_model.layers.0.input_layernorm.weight" in group_names[3]  # RMSNorm
    assert "model.multi_modal_projector.linear_1.bias" in group_names[3]
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in group_names[2]
    assert not any("vision_tower" in name for names_ in group_names for name in names_)  # frozen
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert set().union(*group_names) == trainable


def test_training_marks_the_predictors_trained_only_when_they_train():
    model = tiny_model(predictors_trained=False)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "predictor" not in name
    mark_predictors_trained(model)
    assert model.config.predictors_trained is False
    model.model.image_score_predictor.requires_grad_(True)
    mark_predictors_trained(model)
    assert model.config.predictors_trained is True
