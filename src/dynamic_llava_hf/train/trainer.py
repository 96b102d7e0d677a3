"""Training Dynamic-LLaVA with the Hugging Face `Trainer` (METHOD.md §5).

The model's training forward (`model.train()` with `labels`) already samples the Gumbel-softmax keep masks and returns
the loss with the keep-rate terms. This module adds what the official trainer adds around it: the temperature
schedule, the optimizer parameter groups with a separate predictor learning rate, and logging of the mask losses,
keep ratios, both learning rates and the temperature.
"""

from dataclasses import dataclass, field

from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments


def dynamic_llava_models(model: nn.Module) -> list[nn.Module]:
    """The Dynamic-LLaVA backbones inside `model` (which may be wrapped, e.g. by PEFT or DDP).

    Matched by class name along the MRO, not by `isinstance`: a model loaded with `trust_remote_code=True` is an
    instance of the folder's copy of `DynamicLlavaModel`, a different class object with the same name.
    """
    return [
        module
        for module in model.modules()
        if any(cls.__name__ == "DynamicLlavaModel" for cls in type(module).__mro__)
    ]


def mark_predictors_trained(model: nn.Module) -> None:
    """Sets `config.predictors_trained` on every Dynamic-LLaVA backbone in `model` that trains a predictor."""
    for backbone in dynamic_llava_models(model):
        trains_predictor = any(
            parameter.requires_grad for name, parameter in backbone.named_parameters() if "predictor" in name
        )
        if trains_predictor:
            backbone.config.predictors_trained = True


def set_gumbel_tau(model: nn.Module, tau: float) -> None:
    backbones = dynamic_llava_models(model)
    if not backbones:
        raise ValueError(f"{type(model).__name__} contains no Dynamic-LLaVA model whose temperature could be set")
    for backbone in backbones:
        backbone.gumbel_tau = tau


class GumbelTemperatureCallback(TrainerCallback):
    """Anneals the Gumbel-softmax temperature exponentially from `start_tau` to `end_tau` over training:
    `tau = start * (end / start) ** (global_step / max_steps)`, set before every optimizer step."""

    def __init__(self, start_tau: float = 1.0, end_tau: float = 0.1):
        if start_tau <= 0 or end_tau <= 0:
            raise ValueError(f"Gumbel temperatures must be > 0, got start_tau={start_tau}, end_tau={end_tau}")
        self.start_tau = start_tau
        self.end_tau = end_tau
        self.tau = start_tau

    def tau_at(self, step: int, max_steps: int) -> float:
        progress = min(step / max_steps, 1.0) if max_steps > 0 else 0.0
        return self.start_tau * (self.end_tau / self.start_tau) ** progress

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.tau = self.tau_at(state.global_step, state.max_steps)
        if model is not None:
            set_gumbel_tau(model, self.tau)


def predictor_parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    predictor_lr: float,
    predictor_weight_decay: float,
    decay_parameter_names: list[str] | None = None,
) -> list[dict]:
    """The official four optimizer groups, in order: predictors with / without weight decay (`predictor_lr`), then
    everything else with / without weight decay (`learning_rate`). Predictor = parameter name containing
    "predictor"; frozen parameters are left out. `decay_parameter_names` default to what the `Trainer` decays (no
    biases, no normalization weights), as in the official trainer."""
    if decay_parameter_names is None:
        decay_parameter_names = Trainer.get_decay_parameter_names(None, model)  # the method reads no trainer state
    decay = set(decay_parameter_names)
    groups = {(True, True): [], (True, False): [], (False, True): [], (False, False): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[("predictor" in name, name in decay)].append(param)
    return [
        {"params": groups[True, True], "lr": predictor_lr, "weight_decay": predictor_weight_decay},
        {"params": groups[True, False], "lr": predictor_lr, "weight_decay": 0.0},
        {"params": groups[False, True], "lr": learning_rate, "weight_decay": weight_decay},
        {"params": groups[False, False], "lr": learning_rate, "weight_decay": 0.0},
    ]


@dataclass
class DynamicLlavaTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the official training-only knobs (defaults: the released 7B/13B scripts)."""

    predictor_lr: float = field(default=2e-4, metadata={"help": "learning rate of the predictors"})
    predictor_weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the predictors"})
    gumbel_start_tau: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature at step 0"})
    gumbel_end_tau: float = field(default=0.1, metadata={"help": "Gumbel-softmax temperature at the last step"})


# Output fields averaged over the logging interval and logged under the same names.
LOGGED_OUTPUTS = (
    "lm_loss",
    "image_mask_loss",
    "output_text_mask_loss",
    "instruct_mask_loss",
    "image_keep_ratio",
    "output_text_keep_ratio",
    "instruct_keep_ratio",
)


class DynamicLlavaTrainer(Trainer):
    """`Trainer` with the official optimizer groups, the temperature schedule and sparsity logging.

    Needs `DynamicLlavaTrainingArguments` (or any `TrainingArguments` with the four extra fields).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("predictor_lr", "predictor_weight_decay", "gumbel_start_tau", "gumbel_end_tau"):
            if not hasattr(self.args, name):
                raise TypeError(f"DynamicLlavaTrainer needs DynamicLlavaTrainingArguments (missing `{name}`)")
        if not any(isinstance(callback, GumbelTemperatureCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(GumbelTemperatureCallback(self.args.gumbel_start_tau, self.args.gumbel_end_tau))
        # The keep-rate losses are per-batch means, so the whole loss is a per-micro-batch mean that the Trainer
        # averages over gradient accumulation, as in the official trainer (not a token sum over the accumulated batch).
        self.model_accepts_loss_kwargs = False
        self._sparsity_sums: dict[str, float] = {}
        self._sparsity_counts: dict[str, int] = {}
        self._step_learning_rates: list[float] | None = None

    def train(self, *args, **kwargs):
        # Training is what makes the predictors worth using: from now on (and in every checkpoint saved) calls without
        # `sparsity=` use them, also on a fresh `convert llava-hf` model whose config says predictors_trained=False.
        mark_predictors_trained(self.model)
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = predictor_parameter_groups(
                model,
                learning_rate=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                predictor_lr=self.args.predictor_lr,
                predictor_weight_decay=self.args.predictor_weight_decay,
                decay_parameter_names=self.get_decay_parameter_names(model),
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)  # each group carries its own learning rate
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            # The learning rates this step uses (the scheduler moves them after the optimizer step).
            self._step_learning_rates = [group["lr"] for group in self.optimizer.param_groups]
            for name in LOGGED_OUTPUTS:
                value = outputs.get(name) if isinstance(outputs, dict) else None
                if value is not None:
                    self._sparsity_sums[name] = self._sparsity_sums.get(name, 0.0) + float(value.detach())
                    self._sparsity_counts[name] = self._sparsity_counts.get(name, 0) + 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add what happened since the previous one
            for name, total in self._sparsity_sums.items():
                logs[name] = round(total / self._sparsity_counts[name], 6)
            self._sparsity_sums, self._sparsity_counts = {}, {}
            if self._step_learning_rates is not None:
                logs["predictor_learning_rate"] = self._step_learning_rates[0]
                logs["llm_learning_rate"] = self._step_learning_rates[2]
            backbones = dynamic_llava_models(self.model)
            if backbones:
                logs["gumbel_tau"] = backbones[0].gumbel_tau
        super().log(logs, start_time)


__all__ = [
    "DynamicLlavaTrainer",
    "DynamicLlavaTrainingArguments",
    "GumbelTemperatureCallback",
    "predictor_parameter_groups",
    "set_gumbel_tau",
]
