"""The attribute reader: a classifier that reads, from a glyph image, what a caption would say about it.

Prompt adherence needs a judge that knows the truth. The glyphs are drawn by code, so every
training image comes with exact labels (:mod:`coursekit.glyphs`); a small CNN trained on them reads
each attribute of a generated image: the layout (one character, or two side by side or stacked),
the character and colour of each, and for a single character its size, position, weight and slant.
:func:`adherence` then reports, per attribute, the share of generated images that show what their
prompt asked for. Attributes that do not apply (a second colour on a one-character image) are left
out of both training and scoring.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.checkpoints import float_weights, load_checkpoint, load_model_weights
from coursekit.glyphs import CHARACTERS, COLOURS, POSITIONS, SIZES, SLANTS, WEIGHTS, Scene, make_glyphs
from coursekit.training import TrainConfig, train

SHIPPED_READER = Path(__file__).parent / "assets" / "glyphs_attribute_reader.pt"  # tools/make_attribute_reader.py

NOT_APPLICABLE = -100  # cross-entropy's ignore_index
ATTRIBUTES = {
    "layout": ("one", "left of", "above"),
    "character": CHARACTERS,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "weight": WEIGHTS,
    "slant": SLANTS,
    "second character": CHARACTERS,
    "second colour": tuple(COLOURS),
}
SINGLE_ONLY = ("size", "position", "weight", "slant")
PAIR_ONLY = ("second character", "second colour")


def scene_labels(scene: Scene) -> dict[str, int]:
    """Each attribute's class index for a scene, :data:`NOT_APPLICABLE` where it does not apply."""
    first = scene.glyphs[0]
    labels = {
        "layout": ATTRIBUTES["layout"].index(scene.relation or "one"),
        "character": CHARACTERS.index(first.character),
        "colour": ATTRIBUTES["colour"].index(first.colour),
    }
    for name in SINGLE_ONLY:
        labels[name] = ATTRIBUTES[name].index(getattr(first, name)) if len(scene.glyphs) == 1 else NOT_APPLICABLE
    second = scene.glyphs[1] if len(scene.glyphs) == 2 else None
    labels["second character"] = CHARACTERS.index(second.character) if second else NOT_APPLICABLE
    labels["second colour"] = ATTRIBUTES["colour"].index(second.colour) if second else NOT_APPLICABLE
    return labels


def label_tensor(scenes: list[Scene]) -> torch.Tensor:
    """(N, number of attributes) int64, in the order of :data:`ATTRIBUTES`."""
    return torch.tensor([[scene_labels(scene)[name] for name in ATTRIBUTES] for scene in scenes])


class AttributeReader(nn.Module):
    """Images (B, 3, 32, 32) in [-1, 1] -> one row of logits per attribute (a dict of (B, classes))."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
            )  # fmt: skip

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))  # 4x4
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({name.replace(" ", "_"): nn.Linear(256, len(v)) for name, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.shared(self.features(images))
        return {name: self.heads[name.replace(" ", "_")](shared) for name in ATTRIBUTES}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """The predicted class of every attribute: (N, number of attributes) int64."""
        device = next(self.parameters()).device
        rows = []
        for start in range(0, len(images), batch_size):
            logits = self(images[start : start + batch_size].to(device))
            rows.append(torch.stack([logits[name].argmax(dim=1) for name in ATTRIBUTES], dim=1).cpu())
        return torch.cat(rows)


def reader_loss():
    """The ``loss_fn(model, batch, generator)`` for :func:`coursekit.training.train`: the sum over attributes
    of the cross-entropy, skipping attributes that do not apply; batches are (images, label rows)."""

    def loss_fn(model: AttributeReader, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = model(images)
        return sum(
            F.cross_entropy(logits[name].float(), labels[:, column], ignore_index=NOT_APPLICABLE)
            for column, name in enumerate(ATTRIBUTES)
        )

    return loss_fn


def reader_recipe(device: str = "auto") -> TrainConfig:
    """How the shipped reader was trained: 1,500 steps of 128 glyphs (about 3 minutes on a 2-core CPU)."""
    return TrainConfig(max_steps=1500, batch_size=128, learning_rate=2e-3, warmup_steps=50, ema_decay=0.0,
                       precision="fp32", device=device, progress=False)  # fmt: skip


def train_attribute_reader(
    count: int = 20_000, config: TrainConfig | None = None, seed: int = 0, run_dir=None
) -> AttributeReader:
    """Train a reader on ``count`` freshly drawn glyphs of every pair of colour and character (the held-out
    pairs included: the judge must know them even where the generator never saw them)."""
    glyphs = make_glyphs(count, seed=seed + 1000, split="any")
    reader = AttributeReader()
    state = train(reader, (glyphs.images, label_tensor(glyphs.scenes)), reader_loss(), config or reader_recipe(),
                  run_dir=run_dir)  # fmt: skip
    return state.ema_model.eval()


def load_attribute_reader(path: str | Path = SHIPPED_READER, device: str | torch.device = "cpu") -> AttributeReader:
    """The reader that ships inside coursekit (or one saved the same way), in eval mode: the course's judge
    of prompt adherence, so that no notebook spends minutes training it."""
    payload = load_checkpoint(path)
    reader = AttributeReader(**payload.get("reader_config", {}))
    load_model_weights(reader, float_weights(payload["weights"]), path)
    return reader.to(device).eval()


def wilson_interval(share: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share measured on ``count`` trials (Wilson 1927).

    Unlike share +- 1.96 standard errors it stays inside [0, 1] and is not empty at a share of 0 or 1:
    198 hits out of 200 give [0.96, 1.00], not [0.98, 1.00].
    """
    if count <= 0 or math.isnan(share):
        return float("nan"), float("nan")
    centre = (share + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return max(0.0, centre - half), min(1.0, centre + half)


def adherence(read: torch.Tensor, asked: list[Scene]) -> dict[str, float]:
    """Per attribute, the share of images whose reading matches what their prompt asked for, over the images
    where the attribute applies; ``read`` comes from :meth:`AttributeReader.read`. NaN where none applies."""
    wanted = label_tensor(asked)
    shares = {}
    for column, name in enumerate(ATTRIBUTES):
        applies = wanted[:, column] != NOT_APPLICABLE
        matches = (read[applies, column] == wanted[applies, column]).float()
        shares[name] = matches.mean().item() if applies.any() else float("nan")
    return shares
