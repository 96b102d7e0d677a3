import argparse
import json
import subprocess
import sys

import pytest

from dynamic_llava_hf import DynamicLlavaConfig, configuration_dynamic_llava
from dynamic_llava_hf.bench import PRESETS
from dynamic_llava_hf.cli import main
from dynamic_llava_hf.reference_check import REFERENCE_SCENARIOS
from dynamic_llava_hf_cli import BENCH_PRESETS, VISION_SELECTORS, build_parser, config_overrides


def test_demo_answers_with_the_shipped_model_and_draws_the_kept_patches(tmp_path, capsys):
    output = tmp_path / "demo.png"
    assert main(["demo", "--num-images", "2", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    # The demo model sees 36 image tokens per picture (96 px, 16 px patches) and keeps floor(36 * 0.2) = 7.
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
    assert len(rows) == len(REFERENCE_SCENARIOS) * 4  # the reference holds 4 samples
    assert all(row["tokens_match"] and row["kv_lengths_match"] and row["max_logit_diff"] <= 1e-4 for row in rows)


# ---------------------------------------------------------------------------------------------------------------------
# Manners: help text everywhere, a fast --help, one-line errors


def all_parsers(parser):
    """`parser` and every sub-command parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from all_parsers(child)


def test_every_option_has_help_text():
    for parser in all_parsers(build_parser("convert")):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog}: {action.dest} has no help text"


def test_help_imports_neither_torch_nor_transformers():
    """--help answers without loading torch or transformers (seconds), except `convert`'s: its options come from
    `DynamicLlavaConfig`."""
    commands = [[], ["demo"], ["train-demo"], ["eval"], ["check-reference"], ["bench"]]
    script = (
        "import sys\n"
        "from dynamic_llava_hf_cli import main\n"
        f"for command in {commands!r}:\n"
        "    try:\n"
        "        main([*command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_convert_options_are_the_config_fields():
    src, dst = "source", "destination"
    args = build_parser("convert").parse_args(
        ["convert", "llava-hf", src, dst, "--vision-keep-rate", "0.3", "--no-use-vision-predictor"]
    )
    assert config_overrides(args) == {"vision_keep_rate": 0.3, "use_vision_predictor": False}
    parser = next(p for p in all_parsers(build_parser("convert")) if p.prog.endswith("convert llava-hf"))
    options = {action.dest for action in parser._actions}
    assert set(DynamicLlavaConfig.__annotations__) <= options  # every field DynamicLlavaConfig adds to LlavaConfig


def test_names_kept_in_the_cli_match_their_homes():
    assert set(BENCH_PRESETS) == set(PRESETS)
    assert VISION_SELECTORS == configuration_dynamic_llava.VISION_SELECTORS


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--num-images", "0"],
        ["demo", "--batch-size", "0"],  # demo has no such option
        ["train-demo", "--out", "x", "--batch-size", "0"],
        ["check-reference", "/nonexistent"],
        ["convert", "llava-hf", "/nonexistent", "out", "--vision-keep-rate", "high"],
    ],
)
def test_bad_options_give_a_one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith("dynamic-llava")


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "llava-hf", "/nonexistent", "{tmp_path}/out", "--no-progress"],
        ["convert", "llava-hf", "/nonexistent", "{tmp_path}/out", "--dtype", "float17"],
        ["demo", "--model", "/nonexistent", "--output", "{tmp_path}/demo.png"],
        ["bench", "--analytic-only", "--dtype", "float17", "--output", "{tmp_path}/bench.json"],
    ],
)
def test_bad_paths_and_values_give_a_one_line_error(argv, tmp_path, capsys):
    assert main([word.format(tmp_path=tmp_path) for word in argv]) == 1
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith(f"dynamic-llava {argv[0]}: error:")
