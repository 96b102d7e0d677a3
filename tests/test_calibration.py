"""`train.calibration`: the output-text predictor's argmax keeps the asked-for share of a calibration run's tokens,
without changing which tokens rank highest."""

import pytest
import torch
from tiny_models import tiny_model

from dynamic_llava_hf.train.calibration import calibrate_output_text_predictor, recorded_output_text_margins


def margins_of(model, hidden):
    with recorded_output_text_margins(model) as recorded:
        model.model.output_text_score_predictor(hidden)
    return torch.cat(recorded)


@pytest.mark.parametrize("keep_rate", [0.25, 0.5, 0.9])
def test_argmax_keeps_the_target_share_and_the_ranking_stays(keep_rate):
    model = tiny_model(use_output_text_predictor=True)
    torch.manual_seed(0)
    hidden = torch.randn(2, 50, model.config.text_config.hidden_size)
    before = margins_of(model, hidden)

    result = calibrate_output_text_predictor(model, lambda: model.model.output_text_score_predictor(hidden), keep_rate)

    after = margins_of(model, hidden)
    assert (after > 0).float().mean().item() == pytest.approx(keep_rate, abs=1 / before.numel())
    assert result["keep_rate_before"] == pytest.approx((before > 0).float().mean().item())
    assert result["calibration_tokens"] == before.numel() == 100
    torch.testing.assert_close(after - before, torch.full_like(before, result["keep_logit_shift"]))


def test_errors_name_the_problem():
    model = tiny_model(use_output_text_predictor=True)
    with pytest.raises(ValueError, match="keep_rate"):
        calibrate_output_text_predictor(model, lambda: None, 0.0)
    with pytest.raises(RuntimeError, match="never called the output-text predictor"):
        calibrate_output_text_predictor(model, lambda: None, 0.5)
    with pytest.raises(ValueError, match="no output-text predictor"):
        calibrate_output_text_predictor(tiny_model(use_output_text_predictor=False), lambda: None, 0.5)
