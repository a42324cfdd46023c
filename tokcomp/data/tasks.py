"""Seeded synthetic task suites for tokcomp-tiny: shapes, text, multi-image and motion questions.

Every item is drawn from its own ``random.Random`` seeded by (task, split, seed, index), so an item
is the same whatever else is generated, and train and eval splits never share a stream. Answers are
correct by construction: the generator decides the answer first and draws the scene to match.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TASKS = ("tc_shapes", "tc_text", "tc_multi", "tc_motion")
IMAGE_SIZE = 112
LABEL_PATCH = 14  # tokcomp-tiny's patch size: training labels are given per 14x14 patch
OBJECT_MIN_COVER = 0.15  # a patch is labelled with an object when the object covers this share of it
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (245, 225, 30),
    "purple": (165, 55, 215),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ORDINALS = ("first", "second", "third", "fourth")
DIRECTIONS = ("left", "right", "up", "down")
TEXT_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: too close to other glyphs at this size
BACKGROUNDS = ("flat", "gradient", "noise", "stripes", "checker")
EVAL_SIZE = 250
# Bumped whenever what the generators draw changes, so stale eval files are rewritten.
GENERATOR_VERSION = 2


@dataclass
class Item:
    """One question about one image, several images, or one video (a list of frames)."""

    task: str
    kind: str  # question type within the task
    question: str
    answer: str
    choices: list[str]
    images: list[Image.Image] = field(default_factory=list)
    video: list[Image.Image] | None = None
    # Per image or frame, per-patch training labels (see ``PATCH_LABELS``); not part of the eval files.
    labels: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)
    # Per answer word (then EOS), per image or frame, the patches that hold the answer's evidence
    # (training only: where the model should look to write that word; empty where nothing tells).
    evidence: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    # More (question, answer) turns about the same pictures, asked after the first answer in one
    # conversation (training only: many lookups per encoded scene; the eval items have none).
    follow_ups: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def target(self) -> str:
        """The answer as the model writes it: text answers are spelled one character per word."""
        return " ".join(self.answer) if self.task == "tc_text" else self.answer

    @property
    def prompt(self) -> str:
        """What the model is asked: multi-image questions name each image before showing it."""
        return multi_image_prompt(self.question, len(self.images)) if self.task == "tc_multi" else self.question


def multi_image_prompt(question: str, num_images: int) -> str:
    return " ".join(f"{ORDINALS[k]} <image>" for k in range(num_images)) + f" {question}"


@dataclass
class Obj:
    shape: str
    color: str
    x: float
    y: float
    r: float


def item_rng(task: str, split: str, seed: int, index: int) -> random.Random:
    """The item's own generator (string seeds hash with sha512: stable across runs and machines)."""
    return random.Random(f"tokcomp-tiny/{task}/{split}/{seed}/{index}")


def normalize_answer(text: str) -> str:
    """Lower case, letters and digits only ("K Q Z." and "kqz" are the same answer)."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


# --- drawing ---------------------------------------------------------------------------------
def background(rng: random.Random, kind: str | None = None, size: int = IMAGE_SIZE) -> Image.Image:
    """A dark-to-mid background, from flat to textured, that bright objects stand out on."""
    kind = kind or rng.choice(BACKGROUNDS)
    base = np.array([rng.randint(25, 110) for _ in range(3)], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "flat":
        field_ = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        field_ = ((xx * math.cos(angle) + yy * math.sin(angle)) / size) * rng.uniform(20, 45)
    elif kind == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, (size // 4, size // 4)).astype(np.float32)
        field_ = np.kron(noise, np.ones((4, 4), np.float32)) * rng.uniform(8, 18)
    elif kind == "stripes":
        period, angle = rng.uniform(6, 16), rng.uniform(0, math.pi)
        field_ = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period) * rng.uniform(10, 22)
    else:
        cell = rng.randint(5, 14)
        field_ = (((xx // cell) + (yy // cell)) % 2 * 2 - 1) * rng.uniform(8, 20)
    pixels = np.clip(base[None, None, :] + field_[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def shape_polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Outline of a shape centred at (x, y) with radius ``r`` (circles are drawn as ellipses)."""
    if shape == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x + r * 0.95, y + r * 0.8), (x - r * 0.95, y + r * 0.8)]
    if shape == "diamond":
        return [(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)]
    if shape == "cross":
        a, b = r, r * 0.35
        quarter = [(b, -a), (b, -b), (a, -b)]  # one arm's corners; the others are quarter turns of it
        pts = [(dx, dy) for k in range(4) for dx, dy in [_turn(p, k) for p in quarter]]
        return [(x + dx, y + dy) for dx, dy in pts]
    raise ValueError(f"no polygon for {shape}")


def _turn(point: tuple[float, float], quarters: int) -> tuple[float, float]:
    x, y = point
    for _ in range(quarters):
        x, y = -y, x
    return x, y


def draw_objects(image: Image.Image, objects: Sequence[Obj], fills: Sequence | None = None) -> Image.Image:
    """The objects drawn over ``image`` in their colours (or in ``fills``, one per object)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for k, o in enumerate(objects):
        fill = COLORS[o.color] if fills is None else fills[k]
        if o.shape == "circle":
            draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
        else:
            draw.polygon(shape_polygon(o.shape, o.x, o.y, o.r), fill=fill)
    return out


# --- per-patch training labels ---------------------------------------------------------------
# Per-patch label groups, each class named by a word of the vocabulary (class 0: nothing there).
# "count" is the number of objects or characters in the picture, the same for every patch; "side"
# and "height" say which half of the picture a patch is in.
LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "color": ("no", *COLORS),
    "shape": ("no", *SHAPES),
    "char": ("no", *TEXT_ALPHABET),
    "ordinal": ("no", *ORDINALS, "fifth"),
    "count": NUMBERS,
    "side": ("left", "right"),
    "height": ("top", "bottom"),
}


def _patch_owner(
    index_map: np.ndarray, count: int, patch: int = LABEL_PATCH, min_cover: float = OBJECT_MIN_COVER
) -> np.ndarray:
    """Per patch, 1 + the index of the part covering most of it (0 if none covers ``min_cover``)."""
    grid = index_map.shape[0] // patch
    onehot = np.eye(count + 1, dtype=np.float32)[index_map]
    cover = onehot.reshape(grid, patch, grid, patch, count + 1).mean((1, 3))[..., 1:]
    if count == 0:
        return np.zeros((grid, grid), np.int64)
    owner = cover.argmax(-1) + 1
    return np.where(cover.max(-1) >= min_cover, owner, 0).astype(np.int64)


def _halves(grid: int) -> dict[str, np.ndarray]:
    rows, cols = np.mgrid[0:grid, 0:grid]
    return {"side": (cols >= grid // 2).astype(np.int64), "height": (rows >= grid // 2).astype(np.int64)}


def object_labels(objects: Sequence[Obj], size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
    """Colour and shape of the object on each patch, and the object count (no randomness used)."""
    index_map = np.asarray(draw_objects(Image.new("L", (size, size)), objects, list(range(1, len(objects) + 1))))
    owner = _patch_owner(index_map.astype(np.int64), len(objects))
    colors = np.array([0] + [list(COLORS).index(o.color) + 1 for o in objects])
    shapes = np.array([0] + [SHAPES.index(o.shape) + 1 for o in objects])
    zeros = np.zeros_like(owner)
    return {"color": colors[owner], "shape": shapes[owner], "char": zeros, "ordinal": zeros,
            "count": np.full_like(owner, len(objects)), **_halves(owner.shape[0])}  # fmt: skip


def text_labels(text: str, row: int, first: int, grid: int = IMAGE_SIZE // LABEL_PATCH) -> dict[str, np.ndarray]:
    """Which letter (and which of the string's letters) is in each cell, and the length."""
    chars, order = np.zeros((grid, grid), np.int64), np.zeros((grid, grid), np.int64)
    for k, letter in enumerate(text):
        chars[row, first + k] = TEXT_ALPHABET.index(letter) + 1
        order[row, first + k] = k + 1
    zeros = np.zeros_like(chars)
    return {"color": zeros, "shape": zeros, "char": chars, "ordinal": order,
            "count": np.full_like(chars, len(text)), **_halves(grid)}  # fmt: skip


def object_mask(labels: dict[str, np.ndarray], obj: Obj) -> np.ndarray:
    """The patches labelled with ``obj`` (a scene's (shape, colour) pairs are distinct)."""
    return (labels["color"] == list(COLORS).index(obj.color) + 1) & (labels["shape"] == SHAPES.index(obj.shape) + 1)


def _with_eos(item: Item, masks: list[list[np.ndarray]]) -> Item:
    """``masks`` per answer word, then an empty step for EOS."""
    empty = [np.zeros_like(labels["color"], dtype=bool) for labels in item.labels]
    item.evidence = [*masks, empty]
    return item


# Objects and letters sit one to a cell of tokcomp-tiny's patch grid, so every patch shows a whole
# object or letter (a vision transformer trained from scratch in minutes cannot piece shapes
# together from fragments spread over several patches).
GRID = IMAGE_SIZE // LABEL_PATCH
OBJECT_RADII = (4.5, 6.5)
ALL_CELLS = [(col, row) for row in range(GRID) for col in range(GRID)]


def cell_centre(index: int) -> float:
    return LABEL_PATCH * index + LABEL_PATCH / 2


def place(rng: random.Random, n: int, avoid: Sequence[tuple[int, int]] = ()) -> list[tuple[float, float]]:
    """Centres of ``n`` distinct grid cells, none of them in ``avoid``."""
    cells = rng.sample([c for c in ALL_CELLS if c not in set(avoid)], n)
    return [(cell_centre(col), cell_centre(row)) for col, row in cells]


def random_objects(rng: random.Random, n: int, avoid: Sequence[tuple[int, int]] = ()) -> list[Obj]:
    """``n`` objects with distinct (shape, colour) pairs in distinct cells."""
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
    radii = [rng.uniform(*OBJECT_RADII) for _ in range(n)]
    centres = place(rng, n, avoid)
    return [Obj(s, c, x, y, r) for (s, c), (x, y), r in zip(pairs, centres, radii, strict=True)]


# --- tc_shapes -------------------------------------------------------------------------------
def _up_to(low: int, high: int, difficulty: float) -> int:
    """The largest count at ``difficulty`` (0: ``low``, 1: ``high``) of a curriculum's range."""
    return low + round((high - low) * min(max(difficulty, 0.0), 1.0))


def pick_kind(rng: random.Random, kinds: Sequence[str], weights: dict[str, float] | None) -> str:
    """The question type of an item: uniform (the eval distribution), or by ``weights`` (training only;
    a kind not named weighs 1)."""
    if not weights:
        return rng.choice(kinds)
    return rng.choices(kinds, [weights.get(k, 1.0) for k in kinds])[0]


KINDS = {
    "tc_shapes": ("color", "shape", "count", "position"),
    "tc_text": ("read",),
    "tc_multi": ("which", "match", "count"),
    "tc_motion": ("direction", "appear", "disappear", "order"),
}


def make_shapes(
    rng: random.Random, difficulty: float = 1.0, kind_weights: dict[str, float] | None = None, follow_ups: int = 0
) -> Item:
    """Colour, shape, count or position of objects in a scene of 1-8 objects (1-2 at difficulty 0)."""
    kind = pick_kind(rng, KINDS["tc_shapes"], kind_weights)
    while True:
        objects = random_objects(rng, rng.randint(1, _up_to(2, 8, difficulty)))
        item = _shapes_question(rng, kind, objects)
        if item is not None:
            item.images = [draw_objects(background(rng), objects)]
            item.labels = [object_labels(objects)]
            (labels,) = item.labels
            evidence = [object_mask(labels, o) for o in objects if _shapes_evidence(item, o)]
            item.follow_ups = _more_questions(
                rng, follow_ups, item.question,
                lambda scene=objects: _shapes_question(rng, pick_kind(rng, KINDS["tc_shapes"], kind_weights), scene),
            )  # fmt: skip
            return _with_eos(item, [[np.any(evidence, axis=0) if evidence else labels["shape"] > 0]])


def _more_questions(
    rng: random.Random, n: int, asked: str, draw: Callable[[], Item | None], tries: int = 4
) -> list[tuple[str, str]]:
    """Up to ``n`` more distinct (question, answer) pairs from ``draw`` (None: no question of that kind
    fits the scene), none of them the question ``asked`` already."""
    seen, out = {asked}, []
    for _ in range(tries * n):
        if len(out) == n:
            break
        item = draw()
        if item is not None and item.question not in seen:
            seen.add(item.question)
            out.append((item.question, item.answer))
    return out


def _shapes_evidence(item: Item, o: Obj) -> bool:
    """Whether object ``o`` is what the question asks about (every object, for a count)."""
    q = item.question
    if item.kind == "color":
        return f"the {o.shape}?" in q
    if item.kind == "shape":
        return f"the {o.color} object" in q
    if item.kind == "position":
        return f"the {o.color} {o.shape} " in q
    return True


def _shapes_question(rng: random.Random, kind: str, objects: list[Obj]) -> Item | None:
    if kind == "count":
        return Item("tc_shapes", kind, "how many objects are there?", NUMBERS[len(objects)], list(NUMBERS[1:9]))
    if kind in ("color", "shape"):  # asked by the other attribute, which must name one object alone
        by = "shape" if kind == "color" else "color"
        unique = [o for o in objects if sum(getattr(p, by) == getattr(o, by) for p in objects) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        if kind == "color":
            return Item("tc_shapes", kind, f"what color is the {o.shape}?", o.color, list(COLORS))
        return Item("tc_shapes", kind, f"what shape is the {o.color} object?", o.shape, list(SHAPES))
    o = rng.choice(objects)
    centre = IMAGE_SIZE / 2
    if rng.random() < 0.5:
        if abs(o.x - centre) < 12:
            return None
        answer = "left" if o.x < centre else "right"
        return Item("tc_shapes", kind, f"is the {o.color} {o.shape} on the left or right?", answer, ["left", "right"])
    if abs(o.y - centre) < 12:
        return None
    answer = "top" if o.y < centre else "bottom"
    return Item("tc_shapes", kind, f"is the {o.color} {o.shape} at the top or bottom?", answer, ["top", "bottom"])


# --- tc_text ---------------------------------------------------------------------------------
def make_text(
    rng: random.Random, difficulty: float = 1.0, kind_weights: dict[str, float] | None = None, follow_ups: int = 0
) -> Item:
    """A 3-5 letter string in PIL's built-in font, one letter per cell of a row, on a flat or lightly
    textured background."""
    text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(3, 5)))
    image = background(rng, rng.choice(("flat", "flat", "gradient", "noise")))
    font = ImageFont.load_default(size=rng.randint(12, 14))
    row, first = rng.randrange(GRID), rng.randint(0, GRID - len(text))
    fill = COLORS[rng.choice(("white", "yellow"))]
    draw = ImageDraw.Draw(image)
    for k, letter in enumerate(text):
        draw.text((cell_centre(first + k), cell_centre(row)), letter, font=font, fill=fill, anchor="mm")
    question = rng.choice(("what does the text say?", "read the text."))
    labels = text_labels(text, row, first)
    item = Item("tc_text", "read", question, text, [], images=[image], labels=[labels])
    return _with_eos(item, [[labels["ordinal"] == k + 1] for k in range(len(text))])


# --- tc_multi --------------------------------------------------------------------------------
def single_object_image(rng: random.Random, shape: str, color: str) -> tuple[Image.Image, dict[str, np.ndarray]]:
    ((x, y),) = place(rng, 1)
    obj = Obj(shape, color, x, y, rng.uniform(*OBJECT_RADII))
    return draw_objects(background(rng), [obj]), object_labels([obj])


def make_multi(
    rng: random.Random, difficulty: float = 1.0, kind_weights: dict[str, float] | None = None, follow_ups: int = 0
) -> Item:
    """2-4 images of one object each (2 at difficulty 0): which image shows X, do two images match, how
    many show a shape."""
    n = rng.randint(2, _up_to(2, 4, difficulty))
    kind = pick_kind(rng, KINDS["tc_multi"], kind_weights)
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    ordinals = list(ORDINALS[:n])
    if kind == "which":
        chosen = rng.sample(pairs, n)
        target = rng.randrange(n)
        shape, color = chosen[target]
        question = f"which image shows a {color} {shape}?"
        item = Item("tc_multi", kind, question, ORDINALS[target], ordinals)
    elif kind == "match":
        i, j = sorted(rng.sample(range(n), 2))
        chosen = rng.sample(pairs, n)
        same = rng.random() < 0.5
        if same:
            chosen[j] = chosen[i]
        else:  # a near miss half the time: same shape or same colour
            shape, color = chosen[i]
            near = [p for p in pairs if (p[0] == shape) != (p[1] == color)]
            if rng.random() < 0.5:
                chosen[j] = rng.choice(near)
        question = f"do the {ORDINALS[i]} and {ORDINALS[j]} images match?"
        item = Item("tc_multi", kind, question, "yes" if chosen[i] == chosen[j] else "no", ["yes", "no"])
    else:
        shape = rng.choice(SHAPES)
        count = rng.randint(0, n)
        others = [p for p in pairs if p[0] != shape]
        chosen = [(shape, rng.choice(list(COLORS))) for _ in range(count)] + rng.sample(others, n - count)
        rng.shuffle(chosen)
        question = f"how many images show a {shape}?"
        item = Item("tc_multi", kind, question, NUMBERS[count], list(NUMBERS[: n + 1]))
    pictures = [single_object_image(rng, s, c) for s, c in chosen]
    item.images = [image for image, _ in pictures]
    item.labels = [labels for _, labels in pictures]
    item.follow_ups = _more_questions(
        rng, follow_ups, item.question, lambda: _multi_question(rng, pick_kind(rng, KINDS["tc_multi"], kind_weights),
                                                                chosen),
    )  # fmt: skip
    if kind == "which":
        relevant = [k == target for k in range(n)]
    elif kind == "match":
        relevant = [k in (i, j) for k in range(n)]
    else:
        relevant = [s == shape for s, _ in chosen]
    return _with_eos(item, [[(lab["shape"] > 0) & rel for lab, rel in zip(item.labels, relevant, strict=True)]])


def _multi_question(rng: random.Random, kind: str, chosen: list[tuple[str, str]]) -> Item | None:
    """A question of ``kind`` about images showing the (shape, colour) pairs ``chosen`` (None: none fits)."""
    n, ordinals = len(chosen), list(ORDINALS[: len(chosen)])
    if kind == "which":
        unique = [k for k, pair in enumerate(chosen) if chosen.count(pair) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        shape, color = chosen[target]
        return Item("tc_multi", kind, f"which image shows a {color} {shape}?", ORDINALS[target], ordinals)
    if kind == "match":
        i, j = sorted(rng.sample(range(n), 2))
        answer = "yes" if chosen[i] == chosen[j] else "no"
        return Item("tc_multi", kind, f"do the {ORDINALS[i]} and {ORDINALS[j]} images match?", answer, ["yes", "no"])
    shape = rng.choice(SHAPES)
    count = sum(s == shape for s, _ in chosen)
    return Item("tc_multi", kind, f"how many images show a {shape}?", NUMBERS[count], list(NUMBERS[: n + 1]))


# --- tc_motion -------------------------------------------------------------------------------
def make_motion(
    rng: random.Random, difficulty: float = 1.0, kind_weights: dict[str, float] | None = None, follow_ups: int = 0
) -> Item:
    """An 8-16 frame clip: direction of motion, which object appears or disappears, order of events (with
    the fewest objects at difficulty 0)."""
    frames = rng.randint(8, 16)
    kind = pick_kind(rng, KINDS["tc_motion"], kind_weights)
    direction = rng.choice(DIRECTIONS)
    lane = _lane(rng, direction) if kind == "direction" else []
    low = 1 if kind == "direction" else 2
    count = rng.randint(low, _up_to(low, 3, difficulty))
    objects = random_objects(rng, count, avoid=lane)
    colors = [o.color for o in objects]
    while len(set(colors)) < len(colors):  # colours name the objects here: make them distinct
        objects = random_objects(rng, count, avoid=lane)
        colors = [o.color for o in objects]
    visible = [[True] * frames for _ in objects]
    paths = [[(o.x, o.y)] * frames for o in objects]
    if kind == "direction":
        target = objects[0]
        paths[0] = _lane_path(lane, frames)
        question = f"which way does the {target.color} {target.shape} move?"
        item = Item("tc_motion", kind, question, direction, list(DIRECTIONS))
    elif kind in ("appear", "disappear"):
        cut = rng.randint(frames // 4, frames - frames // 4)
        visible[0] = [(t >= cut) == (kind == "appear") for t in range(frames)]
        question = f"what color is the object that {kind}s?"
        item = Item("tc_motion", kind, question, objects[0].color, colors)
    else:
        first, second = sorted(rng.sample(range(1, frames), 2))
        visible[0] = [t >= first for t in range(frames)]
        visible[1] = [t >= second for t in range(frames)]
        a, b = colors[0], colors[1]
        names = (a, b) if rng.random() < 0.5 else (b, a)
        question = f"which color appears first, {names[0]} or {names[1]}?"
        item = Item("tc_motion", kind, question, a, [a, b])
    back = background(rng)
    scenes = [
        [Obj(o.shape, o.color, *paths[k][t], o.r) for k, o in enumerate(objects) if visible[k][t]]
        for t in range(frames)
    ]
    item.video = [draw_objects(back, scene) for scene in scenes]
    item.labels = [object_labels(scene) for scene in scenes]
    asked = objects[:2] if kind == "order" else objects[:1]
    masks = [np.any([object_mask(lab, o) for o in asked], axis=0) for lab in item.labels]
    return _with_eos(item, [masks])


def _lane(rng: random.Random, direction: str) -> list[tuple[int, int]]:
    """The cells a moving object crosses, in order: 4-6 cells along one row or column."""
    length = rng.randint(4, 6)
    start, across = rng.randint(0, GRID - length), rng.randrange(GRID)
    along = list(range(start, start + length))
    if direction in ("left", "up"):
        along = along[::-1]
    return [(a, across) if direction in ("left", "right") else (across, a) for a in along]


def _lane_path(lane: Sequence[tuple[int, int]], frames: int) -> list[tuple[float, float]]:
    """Cell centres along ``lane`` over ``frames`` frames: first cell first, last cell last."""
    steps = [round(t * (len(lane) - 1) / (frames - 1)) for t in range(frames)]
    return [(cell_centre(lane[k][0]), cell_centre(lane[k][1])) for k in steps]


# (rng, difficulty, kind_weights, follow_ups) -> Item; tc_text and tc_motion ask no follow-ups (one
# question fits a text or a clip).
GENERATORS: dict[str, Callable[[random.Random, float, dict[str, float] | None, int], Item]] = {
    "tc_shapes": make_shapes,
    "tc_text": make_text,
    "tc_multi": make_multi,
    "tc_motion": make_motion,
}


def make_item(
    task: str,
    split: str,
    index: int,
    seed: int = 0,
    difficulty: float = 1.0,
    kind_weights: dict[str, float] | None = None,
    follow_ups: int = 0,
) -> Item:
    """Item ``index`` of a task's split (deterministic); a ``difficulty`` below 1 draws fewer objects or
    images from the same stream, ``kind_weights`` asks some question types more often and ``follow_ups``
    adds up to that many more questions about the same pictures (all three for training only; the
    follow-ups are drawn after everything else, so the item itself does not change)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    return GENERATORS[task](item_rng(task, split, seed, index), difficulty, kind_weights, follow_ups)


def generate(task: str, split: str, n: int, seed: int = 0, start: int = 0) -> list[Item]:
    return [make_item(task, split, i, seed) for i in range(start, start + n)]


def random_guess(items: Sequence[Item]) -> float:
    """Expected accuracy of guessing uniformly among each item's choices (0 for free-form text)."""
    return sum(1 / len(it.choices) if it.choices else 0.0 for it in items) / len(items)


def vocabulary() -> list[str]:
    """Every word the suites' questions and answers use."""
    words = [*COLORS, *SHAPES, *PLURALS.values(), *NUMBERS, *ORDINALS, *DIRECTIONS, *TEXT_ALPHABET]
    words += ["how", "many", "objects", "there", "what", "color", "shape", "is", "the", "object", "on", "left"]
    words += ["or", "right", "at", "top", "bottom", "does", "text", "say", "read", "which", "image", "images"]
    words += ["show", "a", "do", "and", "match", "yes", "no", "way", "move", "appears", "disappears", "first"]
    words += ["fifth"]
    return list(dict.fromkeys(words))


# --- files -----------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def item_record(item: Item, index: int) -> dict:
    return {
        "id": f"{item.task}-{index:05d}",
        "task": item.task,
        "kind": item.kind,
        "question": item.question,
        "answer": item.answer,
        "choices": list(item.choices),
        "images": [png_bytes(im) for im in item.images],
        "video": [png_bytes(fr) for fr in item.video or []],
    }


def record_item(record: dict) -> Item:
    """An Item back from a row of an eval split file."""
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in record["images"]]
    video = [Image.open(io.BytesIO(b)).convert("RGB") for b in record["video"]] or None
    return Item(
        record["task"], record["kind"], record["question"], record["answer"], list(record["choices"]), images, video
    )


def write_mp4(frames: Sequence[Image.Image], path: Path, fps: int = 4) -> None:
    """A clip as H.264 (lossy, for watching: the PNG frames in the parquet file are the data)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def write_eval_splits(
    out_dir: str | Path = "data/tasks",
    n: int = EVAL_SIZE,
    seed: int = 0,
    tasks: Sequence[str] = TASKS,
    mp4: bool = False,
) -> dict[str, Path]:
    """Write ``<out_dir>/<task>/eval.parquet`` for each task (same seed, same bytes) and an index.

    With ``mp4`` the tc_motion clips are also written as ``<out_dir>/tc_motion/videos/<id>.mp4``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    written, summary = {}, {}
    for task in tasks:
        items = generate(task, "eval", n, seed)
        table = pa.Table.from_pylist([item_record(it, i) for i, it in enumerate(items)])
        path = out_dir / task / "eval.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        written[task] = path
        if mp4 and task == "tc_motion":
            (path.parent / "videos").mkdir(exist_ok=True)
            for i, it in enumerate(items):
                write_mp4(it.video, path.parent / "videos" / f"{item_record(it, i)['id']}.mp4")
        summary[task] = {
            "items": n,
            "seed": seed,
            "generator_version": GENERATOR_VERSION,
            "random_guess": round(random_guess(items), 4),
        }
    index = out_dir / "index.json"
    previous = json.loads(index.read_text()) if index.exists() else {}
    index.write_text(json.dumps({**previous, **summary}, indent=2, sort_keys=True) + "\n")
    return written


def read_eval_split(path: str | Path, limit: int | None = None) -> list[Item]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [record_item(r) for r in rows[:limit]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokcomp make-tasks", description=write_eval_splits.__doc__)
    parser.add_argument("--out", default="data/tasks", help="output folder (default: data/tasks)")
    parser.add_argument("--num-items", type=int, default=EVAL_SIZE, help=f"items per task (default {EVAL_SIZE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    parser.add_argument("--mp4", action="store_true", help="also write the tc_motion clips as mp4 files")
    args = parser.parse_args(argv)
    for task, path in write_eval_splits(args.out, args.num_items, args.seed, args.tasks, args.mp4).items():
        print(f"{task}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
