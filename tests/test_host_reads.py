"""Host reads in a forward: a prefill reads its inputs' counts once, before the vision tower is queued, and nothing
else until its cache's end-of-step read; every decision made from those counts equals what reading the tensors gives.

On a GPU a read of a device value waits for all the work queued before it, so a read in the middle of a prefill stalls
the host until the GPU is done. The CPU has no such waits, but the reads are the same operations: `HostReads` records
them (the aten ops behind `.item()`, `bool()`, `int()`, `nonzero`, a tensor made from host values, and `tolist()`).
"""

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dynamic_llava_hf import DynamicLlavaCache, DynamicLlavaStaticCache
from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from dynamic_llava_hf.modeling_dynamic_llava import DynamicLlavaModel
from dynamic_llava_hf.sparsity_dynamic_llava import DecoderStep
from test_generation import generate
from test_modeling_prefill import MIXED_ROWS, RAGGED_ROWS, run
from tiny_models import build_prompts, tiny_model


READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}


class HostReads(TorchDispatchMode):
    """Records, in order, the host reads of the code it wraps (`reads`: where each happened, file:line in this
    package) and the vision tower's first convolution (as "<vision tower>")."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.tolist = torch.Tensor.tolist

    def __enter__(self):
        tolist = self.tolist

        def recorded_tolist(tensor):
            self.reads.append(self.caller())
            return tolist(tensor)

        torch.Tensor.tolist = recorded_tolist
        return super().__enter__()

    def __exit__(self, *exc_info):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc_info)

    @staticmethod
    def caller() -> str:
        frames = [frame for frame in traceback.extract_stack() if "dynamic_llava_hf" in frame.filename]
        return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "elsewhere"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        # A 0-d tensor from a Python scalar (`mask[:, -1] = True`) is filled on the device without a copy.
        if name in READ_OPS or (name.startswith("lift_fresh") and args[0].dim() > 0):
            self.reads.append(self.caller())
        if name == "convolution" and "<vision tower>" not in self.reads:
            self.reads.append("<vision tower>")
        return func(*args, **(kwargs or {}))


def prefill_reads(model, rows, **kwargs) -> list[str]:
    inputs = build_prompts(rows)
    with HostReads() as spy:
        run(model, *inputs, use_cache=True, sparsity=True, **kwargs)
    return spy.reads


@pytest.mark.parametrize("rows", [MIXED_ROWS[:1], RAGGED_ROWS], ids=["batch1", "padded_batch"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_prefill_reads_the_host_once_before_the_vision_tower_and_once_at_the_end(rows, cache):
    model = tiny_model("sdpa")
    if cache == "static":
        past = DynamicLlavaStaticCache(model.config, max_cache_len=64)
    else:
        past = DynamicLlavaCache(model.config)
    reads = prefill_reads(model, rows, **{CACHE_NAME: past})
    assert reads[0].startswith("sparsity_dynamic_llava.py"), reads  # InputCounts.read
    assert reads[1] == "<vision tower>", reads
    # Then only the dynamic cache's end-of-step read (the static cache reads its extrema when next needed).
    after_the_tower = [read.split(":")[0] for read in reads[2:]]
    assert after_the_tower == (["cache_dynamic_llava.py"] if cache == "dynamic" else []), reads


def test_a_compiled_prefill_reads_no_more():
    model = tiny_model("sdpa")
    model.compile_prefill(backend="eager")
    prefill_reads(model, RAGGED_ROWS)  # compiles
    reads = prefill_reads(model, RAGGED_ROWS)
    assert len(reads) == 3 and reads[1] == "<vision tower>", reads


@pytest.fixture
def checked_host_counts(monkeypatch):
    """Checks, at every group of layers, the host's copies of the step's state against the tensors (what the forward
    would read without them), and after pruning that the width from the counts is the kept tokens' maximum. Returns
    a dict counting the checks made with a host copy present."""
    checked = {"visible_all": 0, "persist_counts": 0, "width": 0}
    run_layers, apply = DynamicLlavaModel.run_layers, DecoderStep.apply

    def checked_run_layers(model, layers, group, step, *args, **kwargs):
        if step.visible_all is not None:
            assert step.visible_all == bool(step.visible.all())
            checked["visible_all"] += 1
        if step.persist_counts is not None:
            assert step.persist_counts == step.persist.sum(-1).tolist()
            checked["persist_counts"] += 1
        return run_layers(model, layers, group, step, *args, **kwargs)

    def checked_apply(step, plan):
        keep = plan.keep_computing
        counted = step.kept_counts_on_host(plan) is not None
        apply(step, plan)
        if keep is not None and counted:
            assert step.visible.sum(-1).tolist() == keep.sum(-1).tolist()
            assert step.visible.shape[1] == int(keep.sum(-1).max())
            checked["width"] += 1

    monkeypatch.setattr(DynamicLlavaModel, "run_layers", checked_run_layers)
    monkeypatch.setattr(DecoderStep, "apply", checked_apply)
    return checked


def right_padded(input_ids, attention_mask):
    """The same rows with their padding moved to the end."""
    shifts = (attention_mask == 0).sum(-1).tolist()
    ids = torch.stack([row.roll(-shift) for row, shift in zip(input_ids, shifts)])
    mask = torch.stack([row.roll(-shift) for row, shift in zip(attention_mask, shifts)])
    return ids, mask


# Each case: the rows, and whether the host knows every group's state without a read (else it reads after pruning:
# an image or padding at the end of a row, or a decision whose count only the device knows).
PREFILL_CASES = {
    "one_row": (dict(rows=MIXED_ROWS[:1]), True),
    "left_padded": (dict(rows=MIXED_ROWS), True),
    "text_only_and_two_image_rows": (dict(rows=RAGGED_ROWS), True),
    "fastv": (dict(rows=RAGGED_ROWS, sparsity={"vision_selector": "fastv"}), True),
    "sparsity_off": (dict(rows=RAGGED_ROWS, sparsity=False), True),
    "image_last": (dict(rows=[(3, 1, 0)], image_last=True), False),
    "right_padded": (dict(rows=RAGGED_ROWS, right_padding=True), False),
    "instruct_predictor": (dict(rows=RAGGED_ROWS, sparsity={"use_instruct_predictor": True}), False),
}


@pytest.mark.parametrize("case", PREFILL_CASES, ids=list(PREFILL_CASES))
def test_decisions_from_the_counts_equal_the_tensors_in_a_prefill(checked_host_counts, case):
    case, known_throughout = PREFILL_CASES[case]
    model = tiny_model("sdpa", use_instruct_predictor=True)
    input_ids, attention_mask, pixel_values = build_prompts(case["rows"])
    if case.get("right_padding"):
        input_ids, attention_mask = right_padded(input_ids, attention_mask)
    if case.get("image_last"):  # cut the text token behind the image
        input_ids, attention_mask = input_ids[:, :-1], attention_mask[:, :-1]
    sparsity = case.get("sparsity", {})
    if sparsity is not False:
        sparsity = {"use_vision_predictor": True, "use_instruct_predictor": False, **sparsity}
    run(model, input_ids, attention_mask, pixel_values, use_cache=True, sparsity=sparsity)
    assert checked_host_counts["visible_all"] == (2 if known_throughout else 1)
    assert checked_host_counts["persist_counts"] == (2 if known_throughout else 1)
    assert checked_host_counts["width"] == (int(sparsity is not False) if known_throughout else 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(use_cache=False),
        dict(num_beams=2),
        dict(prefill_chunk_size=23),  # all images in the first chunk, which ends in text
        dict(cache_implementation="static", disable_compile=True),
    ],
    ids=["cached", "no_cache", "beams", "chunked", "static"],
)
def test_decisions_from_the_counts_equal_the_tensors_in_generation(checked_host_counts, kwargs):
    model = tiny_model("sdpa")
    input_ids, attention_mask, pixel_values = build_prompts(RAGGED_ROWS)
    generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=4, sparsity=True, **kwargs)
    assert checked_host_counts["visible_all"] > 0 and checked_host_counts["persist_counts"] > 0
    assert checked_host_counts["width"] > 0


def test_a_later_turn_continues_from_counts_too(checked_host_counts):
    """A second prompt with a new image on the returned cache (stored entries: the layers append behind them)."""
    model = tiny_model("sdpa")
    input_ids, attention_mask, pixel_values = build_prompts(MIXED_ROWS)
    first = generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=3, sparsity=True)
    second_turn, _, second_pixels = build_prompts([(2, 1, 3)] * len(MIXED_ROWS), seed=1)
    ids = torch.cat([first.sequences, second_turn], dim=1)
    mask = torch.cat([attention_mask, torch.ones(ids.shape[0], ids.shape[1] - attention_mask.shape[1]).long()], 1)
    checked_host_counts["width"] = 0
    generate(model, ids, mask, second_pixels, max_new_tokens=3, sparsity=True, **{CACHE_NAME: first.get(CACHE_NAME)})
    assert checked_host_counts["width"] >= 1
