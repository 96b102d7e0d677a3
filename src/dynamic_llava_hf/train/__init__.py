"""Training Dynamic-LLaVA: the `Trainer` subclass and its arguments (`trainer.py`), LLaVA-format data (`data.py`)."""

from .data import LlavaConversationDataset, LlavaDataCollator, to_chat_messages, tokenize_conversation
from .trainer import (
    DynamicLlavaTrainer,
    DynamicLlavaTrainingArguments,
    GumbelTemperatureCallback,
    predictor_parameter_groups,
    set_gumbel_tau,
)


__all__ = [
    "DynamicLlavaTrainer",
    "DynamicLlavaTrainingArguments",
    "GumbelTemperatureCallback",
    "LlavaConversationDataset",
    "LlavaDataCollator",
    "predictor_parameter_groups",
    "set_gumbel_tau",
    "to_chat_messages",
    "tokenize_conversation",
]
