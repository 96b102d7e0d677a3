"""`train/trainer.py`: finding the model, the temperature schedule, optimizer groups, what the trainer needs."""

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
