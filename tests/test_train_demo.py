"""`dynamic-llava train-demo` cannot rot: a few steps of both stages at a tiny size, through the command line."""

import json

from transformers import AutoModelForImageTextToText, AutoProcessor

from dynamic_llava_hf import DynamicLlavaForConditionalGeneration
from dynamic_llava_hf.cli import main
from dynamic_llava_hf.synthetic import SHORT_KINDS
from dynamic_llava_hf.train_demo import STAGE1_INIT_STD


def test_train_demo_smoke_run_writes_a_loadable_dynamic_llava(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train-demo",
        "--out",
        str(out),
        "--tiny",
        "--vision-steps",
        "2",
        "--stage1-steps",
        "3",
        "--stage2-steps",
        "3",
    ]
    assert main(args + ["--batch-size", "8", "--no-progress"]) == 0
    assert "Wrote" in capsys.readouterr().out

    log = json.loads((out / "training_log.json").read_text())
    stage1 = [entry for entry in log["stage1"]["log_history"] if "loss" in entry]
    stage2 = [entry for entry in log["stage2"]["log_history"] if "loss" in entry]
    assert len(stage1) == 3 and len(stage2) == 3
    assert [entry["step"] for entry in log["stage1"]["vision_pretraining"]["log_history"]] == [1, 2]
    # Stage 2 is the Dynamic-LLaVA recipe: keep-rate losses and ratios logged, tau annealed, two learning rates.
    assert all("image_keep_ratio" in entry and "image_mask_loss" in entry for entry in stage2)
    assert stage2[0]["gumbel_tau"] == 1.0 and stage2[-1]["gumbel_tau"] < stage2[0]["gumbel_tau"]
    assert stage2[1]["predictor_learning_rate"] == 10 * stage2[1]["llm_learning_rate"]
    assert "image_keep_ratio" not in stage1[0]
    # Stage 1b logs held-out teacher-forced accuracy as it goes (every 1/16 of the stage), ...
    heldout = [entry for entry in log["stage1"]["log_history"] if "heldout_teacher_forced" in entry]
    assert [entry["step"] for entry in heldout] == [1, 2, 3]
    assert all(set(entry["heldout_teacher_forced"]) == set(SHORT_KINDS) for entry in heldout)
    # ... and each stage ends with the check on more held-out short questions, per kind and overall.
    for stage in ("stage1", "stage2"):
        check = log[stage]["teacher_forced_accuracy"]
        assert set(check["per_kind"]) == set(SHORT_KINDS) and 0.0 <= check["overall"] <= 1.0
    card = (out / "README.md").read_text()
    assert "Teacher-forced accuracy" in card
    # Stage 1b's projector and Llama start from a wider init than transformers' default (it shortens the plateau).
    assert log["stage1"]["init_std"] == STAGE1_INIT_STD != 0.02
    assert f"from scratch with initial weight std {STAGE1_INIT_STD};" in card
    # Stage 2 ends by setting the output-text predictor's threshold to its trained keep rate.
    calibration = log["stage2"]["output_calibration"]
    assert calibration["target_keep_rate"] == 0.5 and calibration["calibration_tokens"] > 0
    assert not list(out.glob("stage*")) and not list(out.glob("checkpoint-*"))

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model) is DynamicLlavaForConditionalGeneration
    assert model.config.use_vision_predictor and model.config.use_output_text_predictor
    # (a few steps leave the initial spread: STAGE1_INIT_STD, not the default 0.02)
    query = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert abs(query.std().item() - STAGE1_INIT_STD) < 0.2 * STAGE1_INIT_STD
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id

    # Refuses to train into a folder that is not empty.
    assert main(args + ["--batch-size", "8", "--no-progress"]) == 1
    assert "not empty" in capsys.readouterr().err
