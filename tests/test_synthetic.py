"""The synthetic task: the contract of make_samples, determinism, and answers that agree with the scene."""

import numpy as np
import pytest

from dynamic_llava_hf.synthetic import (
    COLORS,
    IMAGE_SIZE,
    KINDS,
    LONG_KINDS,
    POSITIONS,
    SHAPES,
    SHORT_KINDS,
    SIZES,
    describe,
    make_samples,
    plural,
)


def test_contract_and_determinism():
    first = make_samples(21, seed=5)
    again = make_samples(21, seed=5)
    other = make_samples(21, seed=6)
    assert [s["kind"] for s in first] == list(KINDS) * 3
    for sample, twin in zip(first, again):
        assert set(sample) >= {"image", "question", "answer", "kind"}
        assert sample["image"].mode == "RGB" and sample["image"].size == (IMAGE_SIZE, IMAGE_SIZE)
        assert isinstance(sample["question"], str) and isinstance(sample["answer"], str) and sample["answer"]
        assert (sample["question"], sample["answer"]) == (twin["question"], twin["answer"])
        assert np.array_equal(np.asarray(sample["image"]), np.asarray(twin["image"]))
    assert any(not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(first, other))
    assert len(SHORT_KINDS) >= 5 and "count" in SHORT_KINDS and "position" in SHORT_KINDS
    assert LONG_KINDS == ("describe",)


def test_kinds_filter_and_bad_kinds():
    samples = make_samples(8, seed=0, kinds=["count", "exists"])
    assert [s["kind"] for s in samples] == ["count", "exists"] * 4
    assert [s["kind"] for s in make_samples(3, seed=0, kinds="size")] == ["size"] * 3
    with pytest.raises(ValueError, match="Unknown question kind.*'colour'"):
        make_samples(2, seed=0, kinds=["colour"])
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_samples(-1, seed=0)


def test_answers_agree_with_the_scene():
    for sample in make_samples(700, seed=3):
        objects, answer, question = sample["objects"], sample["answer"], sample["question"]
        assert 3 <= len(objects) <= 5
        assert len({obj.cell for obj in objects}) == len(objects)
        assert len({(obj.color, obj.shape) for obj in objects}) == len(objects)
        kind = sample["kind"]
        if kind == "color":
            (obj,) = [obj for obj in objects if f"the {obj.shape}?" in question]
            assert answer == obj.color and answer in COLORS
        elif kind == "shape":
            (obj,) = [obj for obj in objects if f"the {obj.color} object" in question]
            assert answer == obj.shape and answer in SHAPES
        elif kind == "count":
            if "objects" in question:
                assert answer == str(len(objects))
            else:
                (shape,) = [shape for shape in SHAPES if f" {plural(shape)} " in question]
                assert answer == str(sum(obj.shape == shape for obj in objects))
        elif kind == "position":
            (obj,) = [obj for obj in objects if f"the {obj.name}?" in question]
            assert answer == obj.position and answer in POSITIONS.values()
        elif kind == "exists":
            present = any(f" {obj.name}?" in question for obj in objects)
            assert answer == ("yes" if present else "no")
        elif kind == "size":
            (obj,) = [obj for obj in objects if f"the {obj.name} " in question]
            assert answer == obj.size and answer in SIZES
        else:
            assert answer == describe(objects)
            assert all(f"a {obj.size} {obj.name} at the {obj.position}" in answer for obj in objects)


def test_objects_are_drawn_where_the_scene_says():
    """Each object's cell holds its colour; most of the image is colourless background."""
    for sample in make_samples(20, seed=9):
        pixels = np.asarray(sample["image"]).astype(int)
        saturated = (pixels.max(-1) - pixels.min(-1)) > 60
        assert saturated.mean() < 0.3
        cell = IMAGE_SIZE // 3
        for obj in sample["objects"]:
            row, col = obj.cell
            block = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            distance = np.abs(block - np.array(COLORS[obj.color])).sum(-1)
            assert (distance < 40).sum() >= 12, (obj, sample["question"])
