"""Matching the output-text predictor's inference decisions to the keep rate it was trained for.

Training keeps a generated token by a Gumbel sample, i.e. with the probability the predictor gives it, so the
keep-rate loss is met on average by a predictor whose probabilities all sit just around the target. Inference keeps a
token when its keep logit beats its drop logit (METHOD.md §4.3), which can keep far fewer: the demo model, trained at
0.5, gave 87% of its generated tokens a keep probability between 0.3 and 0.5, and the argmax kept 13%.
`calibrate_output_text_predictor` shifts the keep logit's bias so that the argmax keeps the wanted share of the
tokens of a calibration run; which tokens are kept (the predictor's ranking) does not change.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch


@contextmanager
def recorded_output_text_margins(model):
    """Within the block, every output-text predictor call appends its keep-minus-drop logit margins (a flat float32
    tensor per call, left on the model's device: a copy to the host would synchronise every decoding step) to the
    yielded list."""
    predictor = model.model.output_text_score_predictor
    if predictor is None:
        raise ValueError("the model has no output-text predictor (config.use_output_text_predictor is off)")
    margins = []

    def record(module, args, logits):
        margins.append((logits[..., 0] - logits[..., 1]).detach().float().flatten())

    hook = predictor.register_forward_hook(record)
    try:
        yield margins
    finally:
        hook.remove()


@torch.no_grad()
def calibrate_output_text_predictor(model, run: Callable[[], object], keep_rate: float) -> dict:
    """Runs `run()` (e.g. generation on training prompts, with the output-text predictor on) while recording the
    predictor's margins, then shifts its keep-logit bias so that a share `keep_rate` of those margins would be
    positive: the argmax rule then keeps that share. Returns what it did, for a training log."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must lie in (0, 1], got {keep_rate}")
    with recorded_output_text_margins(model) as recorded:
        run()
    if not recorded:
        raise RuntimeError("the calibration run never called the output-text predictor (did it generate?)")
    margins = torch.cat(recorded).cpu()
    before = float((margins > 0).float().mean())
    threshold = float(torch.quantile(margins, 1.0 - keep_rate))
    # The last layer maps to (keep, drop) logits; lowering the keep logit by the threshold moves the decision
    # boundary (margin 0) onto that quantile.
    model.model.output_text_score_predictor.output_mlp[-1].bias[0] -= threshold
    return {
        "target_keep_rate": keep_rate,
        "keep_rate_before": before,
        "keep_logit_shift": -threshold,
        "calibration_tokens": margins.numel(),
        "margin_std": float(margins.std()) if margins.numel() > 1 else 0.0,
    }


__all__ = ["calibrate_output_text_predictor", "recorded_output_text_margins"]
