"""Captioned glyphs: coloured characters drawn by code, each image with exact labels and a caption.

The text-prompt chapter needs images that come with words. Drawing them by code gives as many as
we like, offline, with the truth known exactly: every image holds one or two characters rendered at
32x32 in RGB from the fonts that ship inside matplotlib (DejaVu Sans, Serif and Mono, regular or
bold, upright or slanted, so Colab and a classroom without Wi-Fi have them too), and a caption
from a small grammar says what is there:

    "a large red bold 3 on the left"        one character: size, colour, weight, slant, position
    "a blue 7 above a green 2"              two characters and where they stand

Some pairs of colour and character never appear in training (:data:`HELD_OUT_PAIRS`): a model that
draws "a red 3" well has learned to compose words it never saw together. Images are in [-1, 1] like
every image in coursekit; the same seed gives the same images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from coursekit.data import ImageDataset

CHARACTERS = tuple("0123456789")
COLOURS = {  # RGB in [0, 1]
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.70, 0.25, 0.90),
    "white": (0.95, 0.95, 0.95),
}
SIZES = {"small": 12, "large": 20}  # the height of the character's ink, in pixels
POSITIONS = ("left", "right", "top", "bottom", "middle")
WEIGHTS = ("regular", "bold")
SLANTS = ("upright", "italic")
FAMILIES = ("sans", "serif", "mono")  # drawn for variety; captions do not name them
RELATIONS = ("left of", "above")
HELD_OUT_PAIRS = frozenset(
    {("red", "3"), ("green", "7"), ("blue", "5"), ("yellow", "1"), ("purple", "9"), ("white", "0")}
)  # (colour, character): one per colour, never in training
IMAGE_SIZE = 32

_FONT_FILES = {  # (family, weight, slant) -> a font file inside matplotlib
    ("sans", "regular", "upright"): "DejaVuSans.ttf",
    ("sans", "bold", "upright"): "DejaVuSans-Bold.ttf",
    ("sans", "regular", "italic"): "DejaVuSans-Oblique.ttf",
    ("sans", "bold", "italic"): "DejaVuSans-BoldOblique.ttf",
    ("serif", "regular", "upright"): "DejaVuSerif.ttf",
    ("serif", "bold", "upright"): "DejaVuSerif-Bold.ttf",
    ("serif", "regular", "italic"): "DejaVuSerif-Italic.ttf",
    ("serif", "bold", "italic"): "DejaVuSerif-BoldItalic.ttf",
    ("mono", "regular", "upright"): "DejaVuSansMono.ttf",
    ("mono", "bold", "upright"): "DejaVuSansMono-Bold.ttf",
    ("mono", "regular", "italic"): "DejaVuSansMono-Oblique.ttf",
    ("mono", "bold", "italic"): "DejaVuSansMono-BoldOblique.ttf",
}


@dataclass(frozen=True)
class Glyph:
    """One character in a picture, with everything a caption can say about it."""

    character: str
    colour: str
    size: str = "small"
    position: str = "middle"  # for a single character; a pair is placed by its relation
    weight: str = "regular"
    slant: str = "upright"
    family: str = "sans"

    def __post_init__(self) -> None:
        for name, value, allowed in [
            ("character", self.character, CHARACTERS),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, tuple(SIZES)),
            ("position", self.position, POSITIONS),
            ("weight", self.weight, WEIGHTS),
            ("slant", self.slant, SLANTS),
            ("family", self.family, FAMILIES),
        ]:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {list(allowed)}")

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.character


@dataclass(frozen=True)
class Scene:
    """What one image shows: one glyph, or two with a relation (``first`` is ``relation`` ``second``)."""

    glyphs: tuple[Glyph, ...]
    relation: str | None = None  # "left of" or "above" for two glyphs

    def __post_init__(self) -> None:
        if len(self.glyphs) not in (1, 2):
            raise ValueError(f"a scene holds one or two glyphs, got {len(self.glyphs)}")
        if (len(self.glyphs) == 2) != (self.relation is not None):
            raise ValueError("two glyphs need a relation ('left of' or 'above'); one glyph has none")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; choose one of {list(RELATIONS)}")

    @property
    def caption(self) -> str:
        """The sentence that describes the scene, from the course's grammar."""
        if len(self.glyphs) == 1:
            (glyph,) = self.glyphs
            return f"{_noun_phrase(glyph, detailed=True)} {_where(glyph.position)}"
        first, second = self.glyphs
        return f"{_noun_phrase(first)} {self.relation} {_noun_phrase(second)}"

    @property
    def held_out(self) -> bool:
        """Whether the scene shows a pair of colour and character that training never sees."""
        return any(glyph.pair in HELD_OUT_PAIRS for glyph in self.glyphs)


def _noun_phrase(glyph: Glyph, detailed: bool = False) -> str:
    words = ["a"]
    if detailed:
        words.append(glyph.size)
    words.append(glyph.colour)
    if detailed and glyph.weight == "bold":
        words.append("bold")
    if detailed and glyph.slant == "italic":
        words.append("italic")
    words.append(glyph.character)
    return " ".join(words)


def _where(position: str) -> str:
    return {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}.get(
        position, "in the middle"
    )


def parse_caption(caption: str) -> Scene:
    """The scene a caption of the grammar describes (the font family, which captions never name, is "sans").

    Unmarked weight and slant mean regular and upright, as in the captions the dataset writes, so
    ``parse_caption(scene.caption)`` gives back the scene up to its family. Raises a ValueError naming
    what does not fit the grammar.
    """
    words = caption.lower().split()
    for relation in RELATIONS:
        relation_words = relation.split()
        for start in range(1, len(words)):
            if words[start : start + len(relation_words)] == relation_words:
                first, second = words[:start], words[start + len(relation_words) :]
                return Scene((_parse_noun_phrase(first, caption), _parse_noun_phrase(second, caption)), relation)
    places = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
              "in the middle": "middle"}  # fmt: skip
    for phrase, position in places.items():
        if " ".join(words[-3:]) == phrase:
            return Scene((_parse_noun_phrase(words[:-3], caption, detailed=True, position=position),))
    raise ValueError(f"{caption!r} does not end in a place ({', '.join(places)}) nor join two characters with "
                     f"{' or '.join(RELATIONS)}")  # fmt: skip


def _parse_noun_phrase(words: list[str], caption: str, detailed: bool = False, position: str = "middle") -> Glyph:
    if len(words) < 3 or words[0] != "a":
        raise ValueError(f"{caption!r}: expected 'a [size] colour [bold] [italic] character', got {' '.join(words)!r}")
    rest = words[1:]
    size = rest.pop(0) if detailed and rest[0] in SIZES else "small"
    if detailed and size == "small" and words[1] != "small":
        raise ValueError(f"{caption!r}: a single character needs its size (small or large)")
    colour, character = rest[0], rest[-1]
    modifiers = rest[1:-1]
    allowed = ["bold", "italic"] if detailed else []
    if any(word not in allowed for word in modifiers) or len(set(modifiers)) != len(modifiers):
        raise ValueError(f"{caption!r}: unexpected word(s) {modifiers} between colour and character")
    weight = "bold" if "bold" in modifiers else "regular"
    slant = "italic" if "italic" in modifiers else "upright"
    return Glyph(character, colour, size, position, weight, slant)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (the tokenizer's words)."""
    words = ["a", *SIZES, *COLOURS, "bold", "italic", *CHARACTERS, "on", "the", "at", "in"]
    words += ["left", "right", "top", "bottom", "middle", "of", "above"]
    return list(dict.fromkeys(words))  # each once, first appearance first


# ----------------------------------------------------------------------------- drawing


@functools.cache
def _ink(character: str, family: str, weight: str, slant: str) -> torch.Tensor:
    """The character's coverage at 96 px, cropped to its ink: (H, W) in [0, 1]."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _FONT_FILES[family, weight, slant]
    figure = Figure(figsize=(1.6, 1.6), dpi=100, facecolor="black")
    FigureCanvasAgg(figure)
    figure.text(0.5, 0.5, character, fontproperties=FontProperties(fname=font, size=72), color="white",
                ha="center", va="center")  # fmt: skip
    figure.canvas.draw()
    coverage = torch.from_numpy(np.asarray(figure.canvas.buffer_rgba())[..., 0].astype("float32") / 255)
    rows, columns = torch.nonzero(coverage > 0.02, as_tuple=True)
    return coverage[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]


@functools.cache
def glyph_mask(character: str, family: str, weight: str, slant: str, height: int) -> torch.Tensor:
    """The character's coverage with its ink ``height`` pixels tall: (height, width) in [0, 1]."""
    ink = _ink(character, family, weight, slant)
    width = max(1, round(ink.shape[1] * height / ink.shape[0]))
    return F.interpolate(ink[None, None], size=(height, width), mode="area")[0, 0].clamp(0, 1)


def _paste(canvas: torch.Tensor, glyph: Glyph, centre: tuple[float, float]) -> None:
    mask = glyph_mask(glyph.character, glyph.family, glyph.weight, glyph.slant, SIZES[glyph.size])
    height, width = mask.shape
    top = min(max(round(centre[0] - height / 2), 0), IMAGE_SIZE - height)
    left = min(max(round(centre[1] - width / 2), 0), IMAGE_SIZE - width)
    colour = torch.tensor(COLOURS[glyph.colour]).view(3, 1, 1)
    region = canvas[:, top : top + height, left : left + width]
    region.mul_(1 - mask).add_(mask * colour)  # paint over what is there, by coverage


def _single_centre(glyph: Glyph, jitter: tuple[float, float]) -> tuple[float, float]:
    height, width = glyph_mask(glyph.character, glyph.family, glyph.weight, glyph.slant, SIZES[glyph.size]).shape
    margin = 2
    rows = {"top": margin + height / 2, "bottom": IMAGE_SIZE - margin - height / 2}
    columns = {"left": margin + width / 2, "right": IMAGE_SIZE - margin - width / 2}
    row = rows.get(glyph.position, IMAGE_SIZE / 2) + jitter[0]
    column = columns.get(glyph.position, IMAGE_SIZE / 2) + jitter[1]
    return row, column


def render(scene: Scene, jitter: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Draw a scene on black: (3, 32, 32) in [-1, 1]. ``jitter`` shifts it by (rows, columns) pixels."""
    canvas = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
    if len(scene.glyphs) == 1:
        _paste(canvas, scene.glyphs[0], _single_centre(scene.glyphs[0], jitter))
    else:
        near, far = IMAGE_SIZE * 0.28, IMAGE_SIZE * 0.72  # the two halves' centres
        middle = IMAGE_SIZE / 2
        if scene.relation == "left of":
            centres = [(middle + jitter[0], near + jitter[1]), (middle + jitter[0], far + jitter[1])]
        else:  # "above"
            centres = [(near + jitter[0], middle + jitter[1]), (far + jitter[0], middle + jitter[1])]
        for glyph, centre in zip(scene.glyphs, centres):
            _paste(canvas, glyph, centre)
    return canvas * 2 - 1


# ----------------------------------------------------------------------------- many scenes


def _choice(options, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def random_scene(generator: torch.Generator, two_fraction: float = 0.25, split: str = "train") -> Scene:
    """A scene drawn at random: ``split="train"`` never shows a held-out pair, ``"held_out"`` always does
    (in its first glyph), ``"any"`` mixes both."""
    if split not in ("train", "held_out", "any"):
        raise ValueError(f"split must be 'train', 'held_out' or 'any', got {split!r}")
    two = bool(torch.rand((), generator=generator) < two_fraction)
    while True:
        glyphs = []
        for _ in range(2 if two else 1):
            glyphs.append(
                Glyph(
                    character=_choice(CHARACTERS, generator),
                    colour=_choice(tuple(COLOURS), generator),
                    size="small" if two else _choice(tuple(SIZES), generator),
                    position="middle" if two else _choice(POSITIONS, generator),
                    weight=_choice(WEIGHTS, generator),
                    slant=_choice(SLANTS, generator),
                    family=_choice(FAMILIES, generator),
                )
            )
        scene = Scene(tuple(glyphs), _choice(RELATIONS, generator) if two else None)
        if split == "any" or (split == "train") != scene.held_out:
            if split != "held_out" or scene.glyphs[0].pair in HELD_OUT_PAIRS:
                return scene


@dataclass
class CaptionedImages(ImageDataset):
    """An :class:`ImageDataset` whose images come with captions and the scenes behind them; ``labels``
    holds the first character of each image, for tools that want one class per image."""

    captions: list[str] = field(default_factory=list)
    scenes: list[Scene] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not len(self.captions) == len(self.scenes) == len(self):
            raise ValueError(f"need one caption and one scene per image: {len(self)} images, "
                             f"{len(self.captions)} captions, {len(self.scenes)} scenes")  # fmt: skip

    def subset(self, indices: torch.Tensor) -> CaptionedImages:
        picked = [int(index) for index in indices]
        return CaptionedImages(
            self.images[indices], self.labels[indices], self.class_names, self.name,
            [self.captions[index] for index in picked], [self.scenes[index] for index in picked],
        )  # fmt: skip


def make_glyphs(count: int, seed: int = 0, split: str = "train", two_fraction: float = 0.25) -> CaptionedImages:
    """``count`` captioned images, the same for the same arguments (a few thousand a second)."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    generator = torch.Generator().manual_seed(seed)
    scenes, images = [], torch.empty(count, 3, IMAGE_SIZE, IMAGE_SIZE)
    for index in range(count):
        scene = random_scene(generator, two_fraction, split)
        jitter = tuple((torch.rand(2, generator=generator) * 3 - 1.5).tolist())  # up to 1.5 px either way
        images[index] = render(scene, jitter)
        scenes.append(scene)
    labels = torch.tensor([CHARACTERS.index(scene.glyphs[0].character) for scene in scenes])
    captions = [scene.caption for scene in scenes]
    return CaptionedImages(images, labels, list(CHARACTERS), "glyphs", captions, scenes)
