import json

from dynamic_llava_hf.cli import main


def test_demo_answers_with_the_shipped_model_and_draws_the_kept_patches(tmp_path, capsys):
    output = tmp_path / "demo.png"
    assert main(["demo", "--num-images", "2", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept 7 of 36 image tokens") == 2
    assert "Q: Describe the image." in printed and "answers correct" in printed
    assert output.is_file() and output.stat().st_size > 1000
    # Nothing is overwritten unless asked.
    assert main(["demo", "--num-images", "1", "--output", str(output)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["demo", "--num-images", "1", "--output", str(output), "--force", "--vision-selector", "fastv"]) == 0


def test_eval_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(["eval", "--out", str(out), "--samples-per-kind", "2", "--describe-samples", "2", "--no-progress"]) == 0
    )
    assert "| 0.2 | learned |" in capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    assert set(results["accuracy"]) == {"full", "learned", "random", "fastv"}
    assert set(results["description"]) == {"gating_on", "gating_off"}
    assert (out / "eval-accuracy.png").stat().st_size > 1000 and (out / "eval-overlay.png").is_file()
    assert main(["eval", "--out", str(out), "--samples-per-kind", "2", "--no-progress"]) == 1
    assert "already exist" in capsys.readouterr().err


def test_check_reference_reports_a_full_match(reference_dir, capsys):
    assert main(["check-reference", reference_dir, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 16
    assert all(row["tokens_match"] and row["kv_lengths_match"] and row["max_logit_diff"] <= 1e-4 for row in rows)
