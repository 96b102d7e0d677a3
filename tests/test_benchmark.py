"""`dynamic-llava bench` on the tiny preset: what it measures and writes (fields, tables, plot), not how fast it is."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamic_llava_hf.bench import (
    PRESETS,
    BenchSettings,
    build_models,
    calibrate_output_text_predictor,
    make_inputs,
    markdown_report,
    run_benchmark,
)
from dynamic_llava_hf.bench.measure import output_keep_pattern
from dynamic_llava_hf.cli import main

BENCH_ARGS = [
    "bench",
    "--preset",
    "tiny",
    "--device",
    "cpu",
    "--prefill-batch-sizes",
    "1",
    "2",
    "--decode-batch-sizes",
    "1",
    "3",
    "--new-tokens",
    "6",
    "--repeats",
    "2",
    "--warmup",
    "0",
    "--sweep-keep-rates",
    "0.2",
    "0.6",
    "1.0",
    "--no-progress",
    # The compiled runs (Llava's and ours) through generate's compile path, traced by dynamo but not lowered by
    # inductor (whose C++ compilation would take a minute here): the fields are under test, not the speed.
    "--compile-backend",
    "eager",
]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    json_path, plot_path = folder / "tiny.json", folder / "tiny.png"
    return json_path, plot_path, [*BENCH_ARGS, "--output", str(json_path), "--plot", str(plot_path)]


def test_bench_writes_json_markdown_and_plot(bench_run, capsys):
    json_path, plot_path, args = bench_run
    assert main(args) == 0
    out = capsys.readouterr().out
    results = json.loads(json_path.read_text())
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert results["preset"] == "tiny"
    env = results["environment"]
    assert env["device_type"] == "cpu" and env["gpu_figures_measured"] is False
    assert set(results["load_average"]) == {"start", "after_prefill", "after_decode", "end"}
    image_tokens = (84 // 14) ** 2  # the tiny preset's 84 px images in 14 px patches
    kept = int(image_tokens * 0.2)  # the default vision keep rate

    assert [row["batch_size"] for row in results["prefill"]] == [1, 2]
    for row in results["prefill"]:
        assert len(row["ours_ms_samples"]) == len(row["baseline_ms_samples"]) == 2
        assert row["ratio"] == pytest.approx(row["ours_ms"] / row["baseline_ms"])
        # On CPU: the resident-size high-water mark above the size before the call (Linux).
        assert all(isinstance(peak, int) and peak >= 0 for peak in row["peak_memory_bytes"].values())
        flops = row["flops"]
        assert (flops["image_tokens"], flops["kept_image_tokens"]) == (image_tokens, kept)
        for convention in ("exact", "paper"):
            assert 0 < flops[convention]["ratio"] < 1
            assert flops[convention]["ours"] < flops[convention]["baseline"]

    assert [(row["batch_size"], row["new_tokens"]) for row in results["decode"]] == [(1, 6), (3, 6)]
    for row in results["decode"]:
        ours, base = row["ours"], row["baseline"]
        for side in (ours, base):
            assert side["ms_per_token"] > 0 and side["tokens_per_s"] > 0
        low, high = ours["output_keep_rate_row_range"]
        assert 0.0 <= low <= ours["output_keep_rate"] <= high <= 1.0
        assert row["calibration"]["target_keep_rate"] == 0.5
        assert row["calibration"]["calibration_tokens"] == row["batch_size"] * 5  # 6 tokens: 5 decoding steps
        assert ours["image_tokens_kept"] == kept
        assert ours["stored_kv_bytes"] < ours["dense_kv_bytes"]
        assert row["kv_bytes_ratio"] == pytest.approx(ours["stored_kv_bytes"] / ours["dense_kv_bytes"])
        # The baseline's DynamicCache holds exactly the dense amount our report compares against.
        assert base["kv_bytes"] == ours["dense_kv_bytes"]
        assert ours["allocated_kv_bytes"] >= ours["stored_kv_bytes"]
        assert 0 < row["flops_per_token"]["ratio"] <= 1 and 0 < row["bytes_read_per_token"]["ratio"] <= 1

        # transformers' Llava with a static cache, and with it plus the compiled decoding step, beside its default.
        assert set(row["baselines"]) == {"static", "compiled"}
        assert (
            set(row["ms_per_token_ratio_vs"]) == set(row["peak_memory_ratio_vs"]) == {"default", "static", "compiled"}
        )
        assert row["ms_per_token_ratio_vs"]["default"] == row["ms_per_token_ratio"]
        for kind, side in {"default": base, **row["baselines"]}.items():
            assert side["ms_per_token"] > 0 and side["tokens_per_s"] > 0 and side["tokens_per_s_whole_run"] > 0
            assert isinstance(side["peak_memory_bytes"], int) and side["peak_memory_bytes"] >= 0
            assert row["ms_per_token_ratio_vs"][kind] == pytest.approx(ours["ms_per_token"] / side["ms_per_token"])
        # A static cache holds room for the whole generation: at least the dense amount.
        for kind in ("static", "compiled"):
            assert row["baselines"][kind]["kv_bytes"] >= base["kv_bytes"]
        # Ours with the fixed-capacity cache, eager and compiled: the dynamic cache's tokens, room for every token.
        assert set(row["our_modes"]) == {"static", "compiled"}
        for side in row["our_modes"].values():
            assert side["same_tokens_as_dynamic_cache"] is True
            assert side["ms_per_token"] > 0 and side["tokens_per_s"] > 0
            assert isinstance(side["peak_memory_bytes"], int) and side["peak_memory_bytes"] >= 0
            assert side["allocated_kv_bytes"] >= ours["dense_kv_bytes"] > ours["stored_kv_bytes"]
            assert (
                set(side["ms_per_token_ratio_vs"])
                == set(side["peak_memory_ratio_vs"])
                == {
                    "default",
                    "static",
                    "compiled",
                }
            )
        assert isinstance(ours["peak_memory_bytes"], int)

    assert [row["new_tokens"] for row in results["no_cache_decode_flops"]] == [6]
    assert 0 < results["no_cache_decode_flops"][0]["paper"]["ratio"] < 1
    sweep = results["keep_rate_sweep"]
    assert [row["vision_keep_rate"] for row in sweep] == [0.2, 0.6, 1.0]
    assert [row["flops"]["kept_image_tokens"] for row in sweep] == [int(image_tokens * r) for r in (0.2, 0.6, 1.0)]
    assert sweep[-1]["flops"]["paper"]["ratio"] == 1.0
    exact = [row["flops"]["exact"]["ratio"] for row in sweep]
    assert exact == sorted(exact)

    # The Markdown tables: one row per measured point.
    for title, rows in (
        ("### Prefill", 2),
        ("### Decoding", 2),
        ("### Analytic FLOPs", 2),
        ("### Prefill keep-rate", 3),
        ("### Decoding against", 2 * 6),  # per point: three baselines and ours with three caches
    ):
        section = out.split(title, 1)[1].split("###", 1)[0]
        table = [line for line in section.splitlines() if line.startswith("| ")]
        assert len(table) == 1 + rows, section
    assert "No GPU figures" in out
    assert "Llava, static cache + compile" in out and "Dynamic-LLaVA, static cache + compile" in out
    assert out.count("Dynamic-LLaVA static cache + compile ÷ Llava static cache + compile") == 2


def test_bench_refuses_to_overwrite(bench_run, capsys):
    json_path, _, args = bench_run
    json_path.write_text("{}")
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert json_path.read_text() == "{}"


def test_bench_analytic_only_covers_the_real_shapes(tmp_path, capsys):
    path = tmp_path / "7b.json"
    assert (
        main(["bench", "--preset", "llava-1.5-7b", "--analytic-only", "--new-tokens", "256", "--output", str(path)])
        == 0
    )
    results = json.loads(path.read_text())
    prefill = results["prefill_flops"]
    assert prefill["kept_image_tokens"] == 115
    assert prefill["paper"]["baseline"] == pytest.approx(10.1e12, rel=0.02)
    assert prefill["paper"]["ours"] == pytest.approx(2.5e12, rel=0.02)
    assert "| prefill |" in capsys.readouterr().out


def test_bad_settings_are_rejected(capsys):
    with pytest.raises(ValueError, match="Unknown preset"):
        BenchSettings(preset="llava-70b").validate()
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        BenchSettings(new_tokens=(1,)).validate()
    assert main(["bench", "--preset", "tiny", "--sweep-keep-rates", "0", "--analytic-only"]) == 1
    assert "keep rates must lie in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="output_keep_pattern must be one of"):
        BenchSettings(output_keep_pattern="every-third").validate()
    with pytest.raises(ValueError, match="keeps 0.5 of each row"):
        BenchSettings(output_keep_pattern="alternate", output_keep_rate=0.3).validate()


def test_alternate_pattern_keeps_half_of_every_row():
    """`output_keep_pattern="alternate"`: every row keeps every other generated token, in the dynamic cache and in
    the compiled fixed-capacity mode alike (same decisions, so the same tokens); no calibration run."""
    settings = BenchSettings(
        preset="tiny",
        device="cpu",
        prefill_batch_sizes=(),
        decode_batch_sizes=(3,),
        new_tokens=(9,),  # 8 decoding steps: 4 kept per row
        sweep_keep_rates=(),
        baselines=(),
        our_modes=("compiled",),
        compile_backend="eager",
        output_keep_pattern="alternate",
        progress=False,
    )
    (row,) = run_benchmark(settings)["decode"]
    assert row["calibration"] == {"pattern": "alternate"}
    assert row["ours"]["output_keep_rate"] == 0.5 and row["ours"]["output_keep_rate_row_range"] == [0.5, 0.5]
    assert row["our_modes"]["compiled"]["same_tokens_as_dynamic_cache"] is True


def test_compiled_prefill_is_measured_and_labelled():
    settings = BenchSettings(
        preset="tiny",
        device="cpu",
        prefill_batch_sizes=(1, 2),
        decode_batch_sizes=(),
        sweep_keep_rates=(),
        repeats=1,
        compile_backend="eager",
        compile_prefill=True,
        progress=False,
    )
    results = run_benchmark(settings)
    assert results["settings"]["compile_prefill"] is True
    assert [row["batch_size"] for row in results["prefill"]] == [1, 2]
    assert "Ours with its decoder-layer loops compiled (`compile_prefill`" in markdown_report(results)
    with pytest.raises(ValueError, match="compile_prefill needs warmup >= 1"):
        BenchSettings(compile_prefill=True, warmup=0).validate()


def test_compile_prefill_mode_is_passed_on_and_labelled(monkeypatch):
    """The mode reaches `compile_prefill`; a CUDA-graph mode needs a second warm-up run (the recording)."""
    received = []
    monkeypatch.setattr(
        "dynamic_llava_hf.DynamicLlavaForConditionalGeneration.compile_prefill",
        lambda self, **kwargs: received.append(kwargs),
    )
    common = {"preset": "tiny", "device": "cpu", "decode_batch_sizes": (), "sweep_keep_rates": (), "progress": False}
    settings = BenchSettings(
        **common,
        prefill_batch_sizes=(1,),
        repeats=1,
        warmup=2,
        compile_prefill=True,
        compile_prefill_mode="reduce-overhead",
    )
    results = run_benchmark(settings)
    assert received == [{"backend": "inductor", "mode": "reduce-overhead"}]
    assert "backend inductor, mode reduce-overhead; compiled during the warm-up" in markdown_report(results)
    with pytest.raises(ValueError, match="records CUDA graphs: it needs warmup >= 2"):
        BenchSettings(**common, compile_prefill=True, compile_prefill_mode="reduce-overhead", warmup=1).validate()
    with pytest.raises(ValueError, match="compile_prefill_mode applies to compile_prefill, which is off"):
        BenchSettings(**common, compile_prefill_mode="reduce-overhead").validate()


def test_output_keep_pattern_is_undone_after_the_block():
    model, _ = build_models(PRESETS["tiny"], torch.device("cpu"), torch.float32)
    with output_keep_pattern(model, "alternate"):
        assert "output_text_keep" in vars(model.model)
    assert "output_text_keep" not in vars(model.model)
    with output_keep_pattern(model, "calibrated"):
        assert "output_text_keep" not in vars(model.model)


def test_baseline_shares_the_weights_and_matches_with_sparsity_off():
    preset = PRESETS["tiny"]
    model, baseline = build_models(preset, torch.device("cpu"), torch.float32)
    assert baseline.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    inputs = make_inputs(preset, model.config, 2, model.device, model.dtype, seed=0)
    with torch.no_grad():
        expected = baseline(**inputs).logits
        torch.testing.assert_close(model(**inputs, sparsity=False).logits, expected)

        calibration = calibrate_output_text_predictor(model, inputs, target_keep_rate=0.5, new_tokens=12)
    assert calibration["calibration_tokens"] == 2 * 11  # one decision per decoding step and row
    # The initial bias is 0, so the keep logit's bias is now the shift itself.
    assert model.model.output_text_score_predictor.output_mlp[-1].bias[0].item() == pytest.approx(
        calibration["keep_logit_shift"]
    )


def test_host_bound_preset_has_the_7b_depth_at_negligible_width():
    """`host-bound` keeps what a prefill's host work depends on (LLaVA-1.5-7B's layers, its prompt around one image)
    and runs like any preset (sparsification off, it equals Llava)."""
    preset, reference = PRESETS["host-bound"], PRESETS["llava-1.5-7b"]
    config, real = preset.config(), reference.config()
    assert config.text_config.num_hidden_layers == real.text_config.num_hidden_layers
    assert config.vision_config.num_hidden_layers == real.vision_config.num_hidden_layers
    assert preset.num_text_tokens == reference.num_text_tokens
    assert config.image_seq_length == 64 and config.text_config.hidden_size == 64
    model, baseline = build_models(preset, torch.device("cpu"), torch.float32)
    inputs = make_inputs(preset, model.config, 1, model.device, model.dtype, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, sparsity=False).logits, baseline(**inputs).logits)


def test_profile_prefill_example_reports_both_models(tmp_path):
    """examples/profile_prefill.py on `tiny` (CPU: no kernels to count): a timing line per model, the tables saved."""
    script = Path(__file__).parent.parent / "examples" / "profile_prefill.py"
    command = [sys.executable, str(script), "--preset", "tiny", "--device", "cpu", "--dtype", "float32"]
    command += ["--warmup", "1", "--repeats", "2", "--output-dir", str(tmp_path)]
    printed = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout
    for name in ("Dynamic-LLaVA", "Llava"):
        line = rf"^{name}: [0-9.]+ ms per forward \(median of 2\), 0 kernel launches, .*, 0 compiled calls"
        assert re.search(line, printed, re.M)
        assert (tmp_path / f"profile-{name}.txt").read_text().strip()
