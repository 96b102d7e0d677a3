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
    make_sample,
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


def the_only(objects, attribute: str, question: str):
    """The one object whose `attribute` the question names; that attribute is unique in the scene."""
    (obj,) = [obj for obj in objects if f" {getattr(obj, attribute)} " in question.replace("?", " ")]
    assert [getattr(other, attribute) for other in objects].count(getattr(obj, attribute)) == 1
    return obj


def test_answers_agree_with_the_scene():
    for sample in make_samples(700, seed=3):
        objects, answer, question = sample["objects"], sample["answer"], sample["question"]
        assert 3 <= len(objects) <= 5
        assert len({obj.cell for obj in objects}) == len(objects)
        assert len({(obj.color, obj.shape) for obj in objects}) == len(objects)
        kind = sample["kind"]
        if kind == "color":
            obj = the_only(objects, "shape", question)
            assert answer == f"The {obj.shape} {obj.color}."
        elif kind == "shape":
            obj = the_only(objects, "color", question)
            assert answer == f"The {obj.color} {obj.shape}."
        elif kind == "count":
            if "objects" in question:
                assert answer == f"Objects {len(objects)}."
            else:
                (shape,) = [shape for shape in SHAPES if f" {plural(shape)} " in question]
                assert answer == f"The {plural(shape)} {sum(obj.shape == shape for obj in objects)}."
        elif kind == "position":
            obj = the_only(objects, "shape", question)
            assert answer == f"The {obj.shape} {obj.position}." and obj.position in POSITIONS.values()
        elif kind == "exists":
            shapes = [shape for shape in SHAPES if question == f"Is there a {shape}?"]
            colors = [color for color in COLORS if question == f"Is there anything {color}?"]
            if shapes:
                present = any(obj.shape == shapes[0] for obj in objects)
                assert answer == f"A {shapes[0]} {'yes' if present else 'no'}."
            else:
                present = any(obj.color == colors[0] for obj in objects)
                assert answer == f"Anything {colors[0]} {'yes' if present else 'no'}."
        elif kind == "size":
            obj = the_only(objects, "shape", question)
            assert answer == f"The {obj.shape} {obj.size}." and obj.size in SIZES
        else:
            assert answer == describe(objects)
            assert all(f"a {obj.size} {obj.name} at the {obj.position}" in answer for obj in objects)
        # The subject is the object a one-object question names (what `dynamic-llava eval` checks selectors keep).
        if kind in ("color", "position", "size"):
            assert sample["subject"] == the_only(objects, "shape", question)
        elif kind == "shape":
            assert sample["subject"] == the_only(objects, "color", question)
        else:
            assert sample["subject"] is None


def test_short_answers_name_their_object_right_before_the_answer_word():
    """The word that identifies the object comes right before the answer word (see the note in `synthetic`)."""
    values = {*COLORS, *SHAPES, *POSITIONS.values(), *SIZES, "yes", "no", *map(str, range(6))}
    for sample in make_samples(60, seed=4, kinds=SHORT_KINDS):
        words = sample["answer"].rstrip(".").split()
        value_start = next(i for i in range(1, len(words)) if " ".join(words[i:]) in values)
        key = words[value_start - 1]
        assert f" {key}" in sample["question"] or key == "Objects", sample


def test_scene_size_bounds():
    samples = [make_sample(7, index, min_objects=1, max_objects=2) for index in range(40)]
    assert {len(sample["objects"]) for sample in samples} == {1, 2}
    assert describe(samples[0]["objects"][:1]).startswith("There is 1 object: ")


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
