"""`dynamic-llava bench`: presets and settings (`presets.py`), measurements (`measure.py`, timed by `timing.py`), the
report (`report.py`) and the analytic FLOP counts they are compared with (`flops.py`, assembled by `analytic.py`)."""

from .analytic import analytic_results
from .measure import (
    baseline_llava,
    build_models,
    calibrate_output_text_predictor,
    make_inputs,
    run_benchmark,
)
from .presets import PRESETS, BenchPreset, BenchSettings
from .report import markdown_report, plot_keep_rate_sweep, write_outputs


__all__ = [
    "PRESETS",
    "BenchPreset",
    "BenchSettings",
    "analytic_results",
    "baseline_llava",
    "build_models",
    "calibrate_output_text_predictor",
    "make_inputs",
    "markdown_report",
    "plot_keep_rate_sweep",
    "run_benchmark",
    "write_outputs",
]
