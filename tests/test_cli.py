import json

from dynamic_llava_hf.cli import main


def test_demo_prints_a_sparsity_report(capsys):
    assert main(["demo", "--batch-size", "2", "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("row") and len(lines) == 3
    assert "/36" in lines[1]


def test_check_reference_reports_a_full_match(reference_dir, capsys):
    assert main(["check-reference", reference_dir, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 16
    assert all(row["tokens_match"] and row["kv_lengths_match"] and row["max_logit_diff"] <= 1e-4 for row in rows)
