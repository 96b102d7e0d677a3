"""The model on a CUDA GPU: low-precision equivalence with transformers' Llava, PyTorch's fused attention kernels
(flash, memory-efficient), transformers' flash-attention path (flash-attn 2, 3 or 4), batched == per-row generation,
and the compiled static-cache decoding step under CUDA graphs.

Without CUDA (`torch.cuda.is_available()` is False) the whole module is skipped, so CPU-only CI skips it.
`DYNAMIC_LLAVA_TEST_DEVICE=cpu` instead runs the device-agnostic tests on the CPU, a dry run of this file's code
(float16/bfloat16 on the CPU, compiled decoding with inductor's default mode); the parts that only exist on CUDA
(PyTorch's flash and memory-efficient kernels, flash-attn, CUDA graphs) stay skipped.

Low-precision comparisons. The tiny models' logits are of order 0.1-1. Two kernels computing the same function in
float16 (bfloat16) differ by about 1e-3 (1e-2) there, so greedy tokens and keep decisions may legitimately part where
the reference run has a near tie: two logits (or a predictor's keep-drop margin and 0, or two image scores at the
top-k boundary) closer than `TIE`. `compare_rows` then compares each row only up to that step and reports it; any
other difference (a token or decision that flips without a near tie, logits beyond `TOL`) fails. The predictors'
output layers are re-initialised (`decisive_predictors`) so that their margins are of order 0.1 instead of 1e-5
(random init through three small layers), which would make every decision a near tie.
"""

import contextlib
import copy
import logging
import os
import warnings
from dataclasses import dataclass

import pytest
import torch
from transformers import CLIPVisionConfig, CompileConfig
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_flash_attn_4_available

from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from test_compiled_prefill import count_compiled_loop_calls
from test_generation import ROWS, generate, rows_alone
from test_modeling_prefill import run as prefill
from test_static_cache import windowed_cache
from tiny_models import build_prompts, llava_twin, tiny_model, tiny_vision_config


DEVICE = torch.device(os.environ.get("DYNAMIC_LLAVA_TEST_DEVICE") or "cuda")
ON_CUDA = DEVICE.type == "cuda"

pytestmark = pytest.mark.skipif(
    ON_CUDA and not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False); DYNAMIC_LLAVA_TEST_DEVICE=cpu dry-runs the "
    "device-agnostic tests on the CPU",
)
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-only (DYNAMIC_LLAVA_TEST_DEVICE is not cuda)")

LOW_PRECISION = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
# Largest logit difference between two kernels computing the same function (logits of order 0.1-1). float32 on CUDA:
# other reduction orders (cuBLAS per batch shape, fused attention) give ~1e-6; a wrong mask, position or kept token
# moves them by 1e-2 or more. float16/bfloat16: their rounding after every op (measured on the CPU against float32:
# 5e-4 / 1e-2 after 12 greedy steps).
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Below this gap two logits (or a keep-drop margin and 0, or two image scores) are a near tie: see the docstring.
TIE = {dtype: 2 * tol for dtype, tol in TOL.items()}
NEW_TOKENS = 12


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 off: cuDNN convolutions (the vision tower's patch embedding) use TF32 by default, whose 1e-3 rounding
    would differ between a batch and one row."""
    if not ON_CUDA:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------------------
# Models and inputs


def decisive_predictors(model) -> None:
    """Output layers of the predictors at unit gain (std 1/sqrt(fan_in), zero bias): keep-drop margins of order 0.1."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for predictor in (model.model.image_score_predictor, model.model.output_text_score_predictor):
            for layer in predictor.output_mlp:
                if isinstance(layer, torch.nn.Linear):
                    weight = torch.randn(layer.weight.shape, generator=generator) * layer.in_features**-0.5
                    layer.weight.copy_(weight)
                    layer.bias.zero_()


def gpu_model(attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **overrides):
    """The tiny model with a vision tower of head size 16 (PyTorch's flash kernel needs a multiple of 8; the tiny
    tower's is 12), on DEVICE in `dtype`."""
    vision = CLIPVisionConfig(**{**tiny_vision_config(), "hidden_size": 32, "intermediate_size": 64})
    model = tiny_model(attn_implementation, vision_config=vision, **overrides)
    decisive_predictors(model)
    return model.to(DEVICE, dtype)


def on_device(input_ids, attention_mask, pixel_values, dtype):
    return input_ids.to(DEVICE), attention_mask.to(DEVICE), pixel_values.to(DEVICE, dtype)


def prompts(rows, dtype):
    return on_device(*build_prompts(rows), dtype)


class Decisions:
    """Records the predictors' keep-drop margins (logit_keep - logit_drop) while active: `image` one
    `[images, tokens]` tensor per call, `text` one `[batch]` tensor per decoding step."""

    def __init__(self, model):
        self.model, self.image, self.text = model, [], []

    def __enter__(self):
        def image(module, args, logits):
            self.image.append((logits[..., 0] - logits[..., 1]).float().cpu())

        def text(module, args, logits):  # [batch, 1, 2] at a decoding step
            self.text.append((logits[..., 0] - logits[..., 1]).float().cpu().reshape(logits.shape[0]))

        self.hooks = [
            self.model.model.image_score_predictor.register_forward_hook(image),
            self.model.model.output_text_score_predictor.register_forward_hook(text),
        ]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


@dataclass
class RowRun:
    """One row of a greedy generation: `logits [T, V]`, `tokens [T]`; with its decisions, the image predictor's
    margins `[image tokens]` (one image per row) and the output-text margins `[T - 1]` (decoding steps)."""

    logits: torch.Tensor
    tokens: torch.Tensor
    image_margins: torch.Tensor | None = None
    text_margins: torch.Tensor | None = None


def row_runs(out, prompt_length: int, decisions: Decisions | None = None) -> list[RowRun]:
    logits = torch.stack(out.logits, 1).float().cpu()
    tokens = out.sequences[:, prompt_length:].cpu()
    runs = []
    for row in range(tokens.shape[0]):
        image = text = None
        if decisions is not None and decisions.image:
            image = decisions.image[0][row]  # the prefill's call; one image per row
        if decisions is not None and decisions.text:
            text = torch.stack(decisions.text)[:, row]
        runs.append(RowRun(logits[row], tokens[row], image, text))
    return runs


def top_k_set(margins: torch.Tensor, k: int) -> set[int]:
    return set(margins.topk(k).indices.tolist())


def compare_kept(actual_margins, expected_margins, keep: int, dtype, label: str) -> str | None:
    """Asserts that the same `keep` image tokens are kept, unless the reference's scores tie at the top-k boundary
    (then returns a note: what follows is not comparable)."""
    kept, reference = top_k_set(actual_margins, keep), top_k_set(expected_margins, keep)
    if kept == reference:
        return None
    ordered = expected_margins.sort(descending=True).values
    boundary = (ordered[keep - 1] + ordered[keep]) / 2
    gaps = (expected_margins[sorted(kept ^ reference)] - boundary).abs()
    assert gaps.max() <= TIE[dtype], f"{label}: kept image tokens {sorted(kept)} != {sorted(reference)} (no tie)"
    return f"{label}: image tokens {sorted(kept)} vs {sorted(reference)} at a near tie, row not compared"


def compare_rows(actual: RowRun, expected: RowRun, dtype, keep: int | None = None, label: str = "") -> str | None:
    """Asserts that `actual` is `expected` computed another way in `dtype` (see the module docstring): the same image
    tokens kept (`keep` per image), the same keep decisions and tokens, logits within `TOL`, each up to the first near
    tie of the reference run. Returns a note when the comparison stopped at a near tie."""
    tol, tie = TOL[dtype], TIE[dtype]
    if keep is not None and expected.image_margins is not None:
        note = compare_kept(actual.image_margins, expected.image_margins, keep, dtype, label)
        if note:
            return note
    steps = len(expected.tokens)
    token_diff = (actual.tokens != expected.tokens).nonzero()
    first_token = int(token_diff[0]) if len(token_diff) else steps
    first_decision = steps
    if expected.text_margins is not None:
        decision_diff = ((actual.text_margins > 0) != (expected.text_margins > 0)).nonzero()
        first_decision = int(decision_diff[0]) if len(decision_diff) else steps
    # Token t_j comes from the forward that fed t_{j-1}; decision i is made in the forward that fed t_i and changes
    # the logits of the forwards after it (from t_{i+2} on). A difference caused by an earlier one is no error.
    cut, note = steps, None
    if first_token < steps and first_token <= first_decision + 1:
        logits = expected.logits[first_token]
        gap = float(logits.max() - logits[actual.tokens[first_token]])
        assert gap <= tie, f"{label}: token {first_token} differs without a near tie (logit gap {gap:.3g} > {tie})"
        cut, note = first_token + 1, f"{label}: token {first_token} at a near tie (gap {gap:.2g})"
    if first_decision < steps and first_decision < first_token:
        margin = float(expected.text_margins[first_decision])
        assert abs(margin) <= tie, f"{label}: keep decision {first_decision} differs without a near tie ({margin:.3g})"
        cut = min(cut, first_decision + 2)
        note = f"{label}: keep decision {first_decision} at a near tie (margin {margin:.2g})"
    difference = float((actual.logits[:cut] - expected.logits[:cut]).abs().max())
    assert difference <= tol, f"{label}: logits differ by {difference:.3g} > {tol} (first {cut} steps)"
    return note


def compare_generations(
    actual, expected, prompt_length, dtype, label, actual_decisions=None, expected_decisions=None, keep=None
) -> list[str]:
    notes = []
    for row, (mine, theirs) in enumerate(
        zip(row_runs(actual, prompt_length, actual_decisions), row_runs(expected, prompt_length, expected_decisions))
    ):
        note = compare_rows(mine, theirs, dtype, keep, f"{label} row {row}")
        if note:
            notes.append(note)
    report(notes)
    return notes


def report(notes) -> None:
    for note in notes:
        print(note)
        warnings.warn(f"near tie, compared up to it: {note}")


# ---------------------------------------------------------------------------------------------------------------------
# (a) Sparsification off == transformers' Llava, in float16 and bfloat16


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_dense_model_matches_llava_in_low_precision(attn_implementation, dtype):
    model = gpu_model(attn_implementation, torch.float32)
    llava = llava_twin(model.cpu(), attn_implementation).to(DEVICE, dtype)
    model = model.to(DEVICE, dtype)
    inputs = prompts(ROWS, dtype)  # left-padded rows
    ours, theirs = prefill(model, *inputs, sparsity=False), prefill(llava, *inputs)
    valid = inputs[1].bool()
    difference = float((ours.logits.float() - theirs.logits.float())[valid].abs().max())
    assert difference <= TOL[dtype], difference

    ours = generate(model, *inputs, sparsity=False)
    theirs = generate(llava, *inputs)
    compare_generations(ours, theirs, inputs[0].shape[1], dtype, f"ours vs llava {attn_implementation}")


# ---------------------------------------------------------------------------------------------------------------------
# (b) sdpa on PyTorch's flash / memory-efficient kernels == the math kernel, sparsification on


def sdpa_backends(*names):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in names])


@cuda_only
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_flash_sdpa_kernel_matches_math_kernel(dtype):
    """The flash kernel takes no mask. The model passes none where a layer group's rows are uniform (no padding, the
    same kept counts): a prefill of equal rows and a batch of one row's whole generation run on FLASH_ATTENTION alone
    (any masked call would raise "No available kernel"). A left-padded batch needs masks (ragged rows): there the
    masked calls run on EFFICIENT_ATTENTION, the maskless ones (vision tower, predictors) on flash."""
    model = gpu_model("sdpa", dtype)
    keep = int(model.config.image_seq_length * model.config.vision_keep_rate)
    notes = []

    # Prefill of two equal rows: every attention call maskless.
    inputs = prompts([(4, 1, 3), (6, 1, 1)], dtype)
    assert inputs[1].all()
    with sdpa_backends("MATH"), Decisions(model) as expected_decisions:
        expected = prefill(model, *inputs)
    with sdpa_backends("FLASH_ATTENTION"), Decisions(model) as actual_decisions:
        actual = prefill(model, *inputs)
    for row in range(2):
        label = f"flash prefill row {row}"
        note = compare_kept(actual_decisions.image[0][row], expected_decisions.image[0][row], keep, dtype, label)
        if note:
            notes.append(note)
            continue
        difference = float((actual.logits[row].float() - expected.logits[row].float()).abs().max())
        assert difference <= TOL[dtype], f"{label}: logits differ by {difference:.3g}"
    report(notes)

    # Generation, one row: uniform throughout, so flash only.
    single = prompts([(5, 1, 3)], dtype)
    with sdpa_backends("MATH"), Decisions(model) as expected_decisions:
        expected = generate(model, *single)
    with sdpa_backends("FLASH_ATTENTION"), Decisions(model) as actual_decisions:
        actual = generate(model, *single)
    notes += compare_generations(
        actual, expected, single[0].shape[1], dtype, "flash generate", actual_decisions, expected_decisions, keep
    )

    # Generation, left-padded rows whose keep decisions differ: masked calls on the memory-efficient kernel.
    batch = prompts(ROWS, dtype)
    with sdpa_backends("MATH"), Decisions(model) as expected_decisions:
        expected = generate(model, *batch)
    with sdpa_backends("FLASH_ATTENTION", "EFFICIENT_ATTENTION"), Decisions(model) as actual_decisions:
        actual = generate(model, *batch)
    notes += compare_generations(
        actual,
        expected,
        batch[0].shape[1],
        dtype,
        "flash+efficient generate",
        actual_decisions,
        expected_decisions,
        keep,
    )
    print(f"{dtype}: {len(notes)} near tie(s)")


# ---------------------------------------------------------------------------------------------------------------------
# (c) transformers' flash attention (the flash-attn packages: 2, 3 or 4, whichever is installed) == sdpa

# transformers' own checks (importable, and usable on this GPU); flash-attn 4 ships a `flash_attn` package too, so
# finding that module would not tell flash-attn 2 from 4.
FLASH_IMPLEMENTATIONS = [
    pytest.param(
        f"flash_attention_{version}", marks=pytest.mark.skipif(not available(), reason=f"{package} is not usable")
    )
    for version, package, available in (
        (2, "flash-attn", is_flash_attn_2_available),
        (3, "flash-attn 3 (flash_attn_interface)", is_flash_attn_3_available),
        (4, "flash-attn-4", is_flash_attn_4_available),
    )
]


@cuda_only
@pytest.mark.parametrize("implementation", FLASH_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_flash_attention_matches_sdpa(dtype, implementation):
    sdpa = gpu_model("sdpa", dtype)
    flash = copy.deepcopy(sdpa)
    flash.set_attn_implementation(implementation)  # checks that the kernels are usable, as from_pretrained does
    assert flash.config.text_config._attn_implementation == implementation
    keep = int(sdpa.config.image_seq_length * sdpa.config.vision_keep_rate)
    inputs = prompts(ROWS, dtype)
    with Decisions(sdpa) as expected_decisions:
        expected = generate(sdpa, *inputs)
    with Decisions(flash) as actual_decisions:
        actual = generate(flash, *inputs)
    compare_generations(
        actual, expected, inputs[0].shape[1], dtype, implementation, actual_decisions, expected_decisions, keep
    )


# ---------------------------------------------------------------------------------------------------------------------
# (d) Batched == per-row generation, sparsification on


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_batched_generation_equals_per_row(attn_implementation, cache_implementation):
    dtype = torch.float32
    model = gpu_model(attn_implementation, dtype)
    keep = int(model.config.image_seq_length * model.config.vision_keep_rate)
    input_ids, attention_mask, pixel_values = build_prompts(ROWS)
    # generate() on CUDA compiles a compileable (static) cache's decoding steps unless told not to: eager here.
    kwargs = {"cache_implementation": cache_implementation, "disable_compile": True}
    with Decisions(model) as batched_decisions:
        batched = generate(model, *on_device(input_ids, attention_mask, pixel_values, dtype), **kwargs)
    prompt = input_ids.shape[1]
    batched_rows = row_runs(batched, prompt, batched_decisions)
    notes = []
    for row, ids, mask, pixels in rows_alone(input_ids, attention_mask, pixel_values, ROWS):
        with Decisions(model) as alone_decisions:
            alone = generate(model, *on_device(ids, mask, pixels, dtype), **kwargs)
        note = compare_rows(
            batched_rows[row],
            row_runs(alone, ids.shape[1], alone_decisions)[0],
            dtype,
            keep,
            f"batched vs alone row {row}",
        )
        notes += [note] if note else []
    report(notes)
    kept = [entry["generated_tokens_kept"] for entry in batched.get(CACHE_NAME).sparsity_report()]
    assert len(set(kept)) > 1, f"rows should keep different numbers of generated tokens: {kept}"


# ---------------------------------------------------------------------------------------------------------------------
# (e) Compiled static-cache decoding (CUDA graphs on CUDA) == eager dynamic-cache decoding


class CapturedLogs(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def cuda_graph_trees() -> str:
    """What torch's CUDA-graph trees recorded on DEVICE (private API: 'unknown' where it moved)."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(DEVICE.index or 0, create_if_none_exists=False)
        if manager is None:
            return "no CUDA-graph tree manager (no graph was recorded)"
        roots = sum(len(nodes) for nodes in manager.roots.values())
        return f"{roots} recorded root graph(s), {len(manager.warmed_up_functions)} warmed-up function(s)"
    except Exception as error:  # noqa: BLE001 - a report, never a failure
        return f"unknown ({type(error).__name__}: {error})"


def graphed_decoding() -> CompileConfig:
    """generate()'s compiled decoding step with CUDA graphs (inductor's default mode on the CPU dry run)."""
    config = CompileConfig(mode="reduce-overhead" if ON_CUDA else "default")
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told so (the CPU dry run)
    return config


@contextlib.contextmanager
def compilation_report(label: str):
    """Resets dynamo, runs the block, then prints and warns what was compiled: graphs, graph breaks and (CUDA)
    whether CUDA graphs were recorded or skipped, and why. A report, not an assertion: inductor may skip CUDA graphs
    for reasons outside this package."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    logs = CapturedLogs()
    loggers = [logging.getLogger(name) for name in ("torch._inductor", "torch._dynamo")]
    for logger in loggers:
        logger.addHandler(logs)
    try:
        yield
        if ON_CUDA:
            torch.cuda.synchronize()
    finally:
        for logger in loggers:
            logger.removeHandler(logs)
    skips = [message for message in logs.messages if "cudagraph" in message.lower()]
    summary = (
        f"{label} on {DEVICE.type}: unique graphs {counters['stats']['unique_graphs']}, graph breaks "
        f"{sum(counters['graph_break'].values())}, cudagraph skips {counters['inductor']['cudagraph_skips']}"
    )
    if ON_CUDA:
        used = counters["inductor"]["cudagraph_skips"] == 0 and not skips
        summary += f"; CUDA graphs {'USED' if used else 'SKIPPED'}: {cuda_graph_trees()}"
        if skips:
            summary += f"; messages: {' | '.join(dict.fromkeys(skips))}"
    print(summary)
    warnings.warn(summary)


def static_cache(model, inputs, windows: str) -> dict:
    if windows == "default":
        return {"cache_implementation": "static"}
    return {CACHE_NAME: windowed_cache(model, inputs, "greedy")}


@pytest.mark.parametrize("windows", ["default", "several"])
def test_compiled_static_cache_decoding_equals_eager(windows):
    """generate(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead")) gives eager
    dynamic-cache decoding's tokens; "several": a cache whose read window takes several sizes in these few steps (one
    CUDA graph recorded per size). Whether CUDA graphs were really used (or skipped, and why) is reported, not
    asserted: inductor may skip them for reasons outside this package. On the CPU (dry run) the mode is inductor's
    default one (CUDA graphs exist only on CUDA)."""
    dtype = torch.float32
    model = gpu_model("sdpa", dtype)
    inputs = prompts(ROWS, dtype)
    prompt = inputs[0].shape[1]
    eager = generate(model, *inputs)

    with compilation_report("compiled decoding"):
        runs = [
            generate(model, *inputs, compile_config=graphed_decoding(), **static_cache(model, inputs, windows))
            for _ in range(2)
        ]

    for label, compiled in zip(("first call", "second call"), runs):
        compare_generations(compiled, eager, prompt, dtype, f"compiled ({label}) vs eager")
        assert torch.equal(compiled.get(CACHE_NAME).stored_lengths(), eager.get(CACHE_NAME).stored_lengths())
        assert compiled.get(CACHE_NAME).sparsity_report() == eager.get(CACHE_NAME).sparsity_report()


def test_inductor_compiled_prefill_equals_eager():
    """`compile_prefill()` with inductor (on CUDA: generated GPU kernels) gives the eager prefill's tokens, keep
    decisions and cache lengths, and logits within float32 rounding; the compiled loop ran once per layer group."""
    dtype = torch.float32
    eager = gpu_model("sdpa", dtype)
    compiled = copy.deepcopy(eager)
    compiled.compile_prefill()
    calls = count_compiled_loop_calls(compiled)
    inputs = prompts(ROWS, dtype)
    expected, got = generate(eager, *inputs), generate(compiled, *inputs)
    assert len(calls) == 2 and calls[1][1] < calls[0][1]  # the prefill's two groups, the second one pruned
    compare_generations(got, expected, inputs[0].shape[1], dtype, "compiled prefill vs eager")
    assert torch.equal(got.get(CACHE_NAME).stored_lengths(), expected.get(CACHE_NAME).stored_lengths())


def test_compiled_prefill_under_cuda_graphs():
    """`compile_prefill(mode="reduce-overhead")`: the prefill's layer loops, vision tower and image predictor as CUDA
    graphs (on the CPU dry run: compiled, no graphs). Two prompt shapes, interleaved, three generations each (warm-up,
    recording, replays), then compiled decoding (its own CUDA graphs) after a replayed prefill: every generation gives
    the eager model's tokens and cache lengths."""
    dtype = torch.float32
    eager = gpu_model("sdpa", dtype)
    compiled = copy.deepcopy(eager)
    # Both batches of 3 rows: one compilation with dynamic lengths serves both (a batch of 1 would compile again).
    batches = [prompts(ROWS, dtype), prompts([(2, 1, 9), (5, 1, 7), (1, 1, 1)], dtype)]
    assert batches[0][0].shape[1] != batches[1][0].shape[1]
    expected = [generate(eager, *inputs) for inputs in batches]
    with compilation_report("prefill under CUDA graphs"):
        compiled.compile_prefill(mode="reduce-overhead")
        for run in range(3):
            for index, (inputs, reference) in enumerate(zip(batches, expected)):
                got = generate(compiled, *inputs)
                compare_generations(got, reference, inputs[0].shape[1], dtype, f"prompt shape {index}, run {run}")
                assert torch.equal(got.get(CACHE_NAME).stored_lengths(), reference.get(CACHE_NAME).stored_lengths())
        got = generate(compiled, *batches[0], cache_implementation="static", compile_config=graphed_decoding())
    compare_generations(got, expected[0], batches[0][0].shape[1], dtype, "graphed prefill and decoding")
    assert compiled.model.compiled_loop_uses_cuda_graphs
    if ON_CUDA:  # a replayed prefill waits for the GPU no more than an eager one
        waits = prefill_waits(compiled, *batches[0])
        assert [where.split(":")[0] for where in waits] == PREFILL_WAITS, waits


def prefill_waits(model, input_ids, attention_mask, pixel_values) -> list[str]:
    """Where a prefill waits for the GPU (file:line), as `torch.cuda.set_sync_debug_mode("warn")` reports every call
    that does (a device value read on the host, a blocking copy from the host)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            prefill(model, input_ids, attention_mask, pixel_values, use_cache=True, sparsity=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


# A prefill may wait twice: for its inputs' counts, read before anything is queued, and for the cache's lengths at its
# end (`tests/test_host_reads.py` checks the same on the CPU); a wait in between stalls the host behind queued work.
PREFILL_WAITS = ["sparsity_dynamic_llava.py", "cache_dynamic_llava.py"]


@cuda_only
@pytest.mark.parametrize("rows", [ROWS[:1], ROWS], ids=["batch1", "batch3"])
def test_a_prefill_synchronises_before_the_vision_tower_and_at_its_end_only(rows):
    waits = prefill_waits(gpu_model("sdpa", torch.float32), *prompts(rows, torch.float32))
    assert [where.split(":")[0] for where in waits] == PREFILL_WAITS, waits
