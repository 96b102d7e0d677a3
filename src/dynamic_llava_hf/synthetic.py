"""A procedurally generated visual question-answering task, small enough to train a LLaVA on a CPU.

Each image is a 96x96 picture on a busy grey background (noise, blotches and lines) with 3 to 5 coloured objects,
one per cell of a 3x3 grid. An object has a colour, a shape and a size; no two objects share both colour and shape.
With 16x16 patches the image is 36 tokens (a cell is 2x2 patches), and each object lies inside one patch: 31 to 33
of the 36 patches carry nothing a question needs, which is the situation Dynamic-LLaVA's image predictor is made for.

Question kinds (`KINDS`): six with short answers ("The circle red.") and `describe`, whose answer lists every object
with its size, colour, shape and position (30 to 60 tokens), for the output-text predictor.

    >>> sample = make_samples(1, seed=0)[0]
    >>> sorted(sample)
    ['answer', 'image', 'kind', 'objects', 'question', 'subject']
"""

import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


IMAGE_SIZE = 96
PATCH_SIZE = 16
CELL_SIZE = IMAGE_SIZE // 3

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 20),
    "purple": (150, 40, 200),
    "orange": (245, 130, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 9, "large": 15}  # both fit inside one patch
# Cell (row, column) -> name; reading order.
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
SHORT_KINDS = ("color", "shape", "count", "position", "exists", "size")
LONG_KINDS = ("describe",)
KINDS = SHORT_KINDS + LONG_KINDS
MIN_OBJECTS, MAX_OBJECTS = 3, 5


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, column) on the 3x3 grid of the questions
    patch: tuple[int, int]  # (row, column) of the one patch (of the cell's 2x2) that holds the object

    @property
    def patch_index(self) -> int:
        """Index of the object's patch among the image tokens (row-major)."""
        return self.patch[0] * (IMAGE_SIZE // PATCH_SIZE) + self.patch[1]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


# ---------------------------------------------------------------------------------------------------------------------
# Scenes and images


def random_scene(
    rng: random.Random, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS
) -> list[SceneObject]:
    """`min_objects` to `max_objects` (default 3 to 5) objects in distinct cells, distinct (colour, shape) pairs, in
    reading order."""
    count = rng.randint(min_objects, max_objects)
    cells = sorted(rng.sample(sorted(POSITIONS), count))
    kinds = rng.sample([(color, shape) for color in COLORS for shape in SHAPES], count)
    per_cell = CELL_SIZE // PATCH_SIZE
    scene = []
    for (color, shape), (row, column) in zip(kinds, cells):
        patch = (row * per_cell + rng.randrange(per_cell), column * per_cell + rng.randrange(per_cell))
        scene.append(SceneObject(color, shape, rng.choice(tuple(SIZES)), (row, column), patch))
    return scene


def draw_background(rng: random.Random) -> Image.Image:
    """Busy, colourless clutter: a grey level, blotches and lines of other greys, then pixel noise."""
    base = rng.randint(90, 170)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (base,) * 3)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(8, 16)):
        grey = rng.randint(60, 200)
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        w, h = rng.randint(5, 26), rng.randint(5, 26)
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=(grey,) * 3)
        else:
            draw.line((x, y, x + w, y + h), fill=(grey,) * 3, width=rng.randint(1, 3))
    image = image.filter(ImageFilter.GaussianBlur(0.8))
    # Gaussian grey noise around mid-grey (what PIL's effect_noise draws, but from our seed: effect_noise is unseeded).
    noise = np.random.default_rng(rng.getrandbits(64)).normal(128, rng.uniform(8, 20), (IMAGE_SIZE, IMAGE_SIZE))
    noise = Image.fromarray(noise.clip(0, 255).astype(np.uint8)).convert("RGB")
    return Image.blend(image, noise, 0.15)


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, rng: random.Random) -> None:
    """Draws `obj` inside its patch, with some jitter if it is small."""
    size = SIZES[obj.size]
    jitter = max((PATCH_SIZE - size) // 2 - 1, 0)
    cx = obj.patch[1] * PATCH_SIZE + PATCH_SIZE // 2 + rng.randint(-jitter, jitter)
    cy = obj.patch[0] * PATCH_SIZE + PATCH_SIZE // 2 + rng.randint(-jitter, jitter)
    left, top, right, bottom = cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2
    color = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=color)
    elif obj.shape == "square":
        draw.rectangle((left + 1, top + 1, right - 1, bottom - 1), fill=color)
    elif obj.shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=color)
    else:  # cross
        arm = max(size // 6, 1)
        draw.rectangle((cx - arm, top, cx + arm, bottom), fill=color)
        draw.rectangle((left, cy - arm, right, cy + arm), fill=color)


def render_scene(scene: list[SceneObject], rng: random.Random) -> Image.Image:
    image = draw_background(rng)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        draw_object(draw, obj, rng)
    return image


# ---------------------------------------------------------------------------------------------------------------------
# Questions: each returns a `Question`, or None when the scene does not allow the question
#
# Every short question names its object by ONE attribute that is unique in the scene (its shape, or its colour), and
# every short answer repeats that word right before the answer word: "What color is the circle?" -> "The circle red.".
# The token that predicts the answer is then the word that identifies the object, so finding the object among the 36
# patches is a single attention lookup keyed by that token. A small model trained from scratch learns this in a few
# hundred steps; answers that start with the answer word ("red"), or that name the object by two words ("the red
# circle small"), need a second hop to carry the identifying word(s) along and stayed near chance after thousands.


class Question(NamedTuple):
    text: str
    answer: str
    subject: SceneObject | None = None  # the one object the question is about, if it is about one


def plural(shape: str) -> str:
    return shape + "es" if shape == "cross" else shape + "s"


def pick_unique(scene, attribute: str, rng) -> SceneObject | None:
    """A random object whose `attribute` ("shape" or "color") no other object in the scene shares, or None."""
    values = [getattr(obj, attribute) for obj in scene]
    unique = [obj for obj in scene if values.count(getattr(obj, attribute)) == 1]
    return rng.choice(unique) if unique else None


def ask_color(scene, rng):
    obj = pick_unique(scene, "shape", rng)
    if obj is None:
        return None
    return Question(f"What color is the {obj.shape}?", f"The {obj.shape} {obj.color}.", obj)


def ask_shape(scene, rng):
    obj = pick_unique(scene, "color", rng)
    if obj is None:
        return None
    return Question(f"What shape is the {obj.color} object?", f"The {obj.color} {obj.shape}.", obj)


def ask_count(scene, rng):
    if rng.random() < 0.4:
        return Question("How many objects are there?", f"Objects {len(scene)}.")
    shape = rng.choice(SHAPES)
    count = sum(obj.shape == shape for obj in scene)
    return Question(f"How many {plural(shape)} are there?", f"The {plural(shape)} {count}.")


def ask_position(scene, rng):
    obj = pick_unique(scene, "shape", rng)
    if obj is None:
        return None
    return Question(f"Where is the {obj.shape}?", f"The {obj.shape} {obj.position}.", obj)


def ask_exists(scene, rng):
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        answer = "yes" if any(obj.shape == shape for obj in scene) else "no"
        return Question(f"Is there a {shape}?", f"A {shape} {answer}.")
    color = rng.choice(tuple(COLORS))
    answer = "yes" if any(obj.color == color for obj in scene) else "no"
    return Question(f"Is there anything {color}?", f"Anything {color} {answer}.")


def ask_size(scene, rng):
    # Worded like the colour question. Asked as "Is the circle small or large?", the model's lookup put 0.30 of its
    # attention on the object (0.98 for colour) and answered at chance after full training.
    obj = pick_unique(scene, "shape", rng)
    if obj is None:
        return None
    return Question(f"What size is the {obj.shape}?", f"The {obj.shape} {obj.size}.", obj)


def describe(scene: list[SceneObject]) -> str:
    parts = [f"a {obj.size} {obj.name} at the {obj.position}" for obj in scene]
    opening = "There is 1 object: " if len(scene) == 1 else f"There are {len(scene)} objects: "
    return opening + ", ".join(parts) + "."


def ask_describe(scene, rng):
    return Question("Describe the image.", describe(scene))


QUESTIONS = {
    "color": ask_color,
    "shape": ask_shape,
    "count": ask_count,
    "position": ask_position,
    "exists": ask_exists,
    "size": ask_size,
    "describe": ask_describe,
}


# ---------------------------------------------------------------------------------------------------------------------
# Samples


def sample_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"dynamic-llava-synthetic/{seed}/{index}")


def ask(kind: str, scene: list[SceneObject], rng: random.Random) -> Question | None:
    """A question of `kind` about `scene` (its text, answer and subject), or None if the scene does not allow one."""
    return QUESTIONS[kind](scene, rng)


def make_sample(
    seed: int,
    index: int,
    kinds: tuple[str, ...] = KINDS,
    min_objects: int = MIN_OBJECTS,
    max_objects: int = MAX_OBJECTS,
) -> dict:
    """Sample `index` of the stream `seed`: the same pair always gives the same sample, whatever else is drawn.
    Training also draws simpler scenes (`min_objects=1`): a lone object teaches what colour, shape, size and position
    look like before the model must find one object among several."""
    rng = sample_rng(seed, index)
    kind = kinds[index % len(kinds)]
    while True:
        scene = random_scene(rng, min_objects, max_objects)
        question = ask(kind, scene, rng)
        if question is not None:
            break
    return {
        "image": render_scene(scene, rng),
        "question": question.text,
        "answer": question.answer,
        "kind": kind,
        "objects": scene,
        "subject": question.subject,
    }


def make_samples(n: int, seed: int, kinds=None) -> list[dict]:
    """`n` samples, deterministic for `seed`: dicts with `image` (PIL RGB, 96x96), `question`, `answer`, `kind`,
    `objects` (the scene, a list of `SceneObject`) and `subject` (the object a colour, shape, position or size
    question is about; None for the other kinds). Kinds cycle in the order given (default: all of `KINDS`)."""
    kinds = check_kinds(kinds)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_sample(seed, index, kinds) for index in range(n)]


def check_kinds(kinds) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in QUESTIONS]
    if unknown or not kinds:
        raise ValueError(f"Unknown question kind(s) {unknown}; valid kinds are {list(KINDS)}")
    return kinds


def corpus_texts() -> list[str]:
    """Every word and phrase the task can produce, for building its tokenizer."""
    texts = list(COLORS) + list(SHAPES) + [plural(shape) for shape in SHAPES] + list(SIZES) + list(POSITIONS.values())
    texts += [str(n) for n in range(10)] + ["yes", "no"]
    for index in range(2000):
        sample = make_sample(-1, index)
        texts.append(f"{sample['question']} {sample['answer']}")
    return texts


__all__ = [
    "KINDS",
    "LONG_KINDS",
    "SHORT_KINDS",
    "Question",
    "SceneObject",
    "ask",
    "describe",
    "make_samples",
    "random_scene",
]
