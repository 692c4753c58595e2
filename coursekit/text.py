"""Words in: a tokenizer, a small text transformer, and a miniature CLIP that learns what captions mean.

Stable Diffusion reads a prompt with CLIP's text encoder (Radford et al. 2021), trained beforehand
to match images with their captions and then frozen. The course does the same at the size of its
glyphs (:mod:`coursekit.glyphs`):

1. :class:`Tokenizer` turns a caption into word indices, padded to a fixed length, ending in an
   end-of-text token; the empty caption ("no prompt") is the end token alone.
2. :class:`TextEncoder`, a small transformer, turns the indices into one vector per token (what
   cross-attention will read) and one vector for the whole caption (its end token's).
3. :class:`MiniCLIP` pairs it with :class:`ImageEncoder`, a small CNN, and trains both so that each
   image's vector points the same way as its own caption's and away from the others' in the batch
   (:func:`contrastive_loss`, CLIP's symmetric cross-entropy). Their cosine similarity then scores
   how well any image matches any caption (:meth:`MiniCLIP.score`, a "CLIP score").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAD, END = "<pad>", "<end>"


class Tokenizer:
    """Word-level tokens over a fixed vocabulary: index 0 pads, index 1 ends the text."""

    def __init__(self, words: list[str], max_length: int = 12):
        if len(set(words)) != len(words) or PAD in words or END in words:
            raise ValueError("the vocabulary must list each word once, without <pad> and <end>")
        self.words = [PAD, END, *words]
        self.index = {word: position for position, word in enumerate(self.words)}
        self.max_length = max_length

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def end_id(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: str | list[str]) -> torch.Tensor:
        """(B, max_length) int64: each caption's word indices, then <end>, then <pad> to the length."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        rows = []
        for caption in captions:
            words = caption.lower().split()
            unknown = [word for word in words if word not in self.index]
            if unknown:
                raise ValueError(
                    f"unknown word(s) {unknown} in {caption!r}; this model knows: {' '.join(self.words[2:])}"
                )
            if len(words) + 1 > self.max_length:
                raise ValueError(f"{caption!r} has {len(words)} words; at most {self.max_length - 1} fit")
            ids = [self.index[word] for word in words] + [self.end_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The captions back from their indices (padding and the end token dropped)."""
        return [" ".join(self.words[i] for i in row.tolist() if i > self.end_id) for row in ids]

    def to_dict(self) -> dict:
        return {"words": self.words[2:], "max_length": self.max_length}


@dataclass
class TextConfig:
    vocabulary_size: int
    max_length: int = 12
    width: int = 64  # the size of each token's vector
    layers: int = 2
    heads: int = 4
    embedding_dim: int = 64  # the shared image-text space of MiniCLIP

    def to_dict(self) -> dict:
        return asdict(self)


class TextEncoder(nn.Module):
    """Token indices (B, L) -> token vectors (B, L, width) and the caption's vector (B, embedding_dim)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocabulary_size, config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, dim_feedforward=4 * config.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.width)
        self.projection = nn.Linear(config.width, config.embedding_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.ndim != 2 or ids.shape[1] > self.config.max_length:
            raise ValueError(f"ids must have shape (B, L <= {self.config.max_length}), got {tuple(ids.shape)}")
        padding = ids == 0  # True where there is no word: attention skips those positions
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        tokens = self.final_norm(self.transformer(x, src_key_padding_mask=padding))
        end_position = (ids == 1).int().argmax(dim=1)  # CLIP reads the caption at its end token
        pooled = tokens[torch.arange(ids.shape[0], device=ids.device), end_position]
        return tokens, self.projection(pooled)


class ImageEncoder(nn.Module):
    """Images (B, 3, 32, 32) -> one vector each (B, embedding_dim). The layout is flattened, not averaged,
    so that where things are ("on the left", "above") survives."""

    def __init__(self, embedding_dim: int = 64, channels: int = 3, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            block(width, width * 2),  # 16x16
            block(width * 2, width * 4),  # 8x8
            block(width * 4, width * 4),  # 4x4
        )
        self.projection = nn.Linear(width * 4 * 16, embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(images).flatten(1))


class MiniCLIP(nn.Module):
    """A text encoder and an image encoder trained to agree (CLIP, Radford et al. 2021, Fig. 3)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(config)
        self.image = ImageEncoder(config.embedding_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's starting temperature

    def embed(self, images: torch.Tensor | None = None, ids: torch.Tensor | None = None):
        """Unit-length vectors of images and/or captions."""
        image = F.normalize(self.image(images), dim=-1) if images is not None else None
        text = F.normalize(self.text(ids)[1], dim=-1) if ids is not None else None
        return image, text

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Similarity logits (B_images, B_captions): cosine similarity times the learned scale."""
        image, text = self.embed(images, ids)
        return self.log_temperature.clamp(max=math.log(100)).exp() * image @ text.T

    @torch.no_grad()
    def score(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The "CLIP score" of each image against its own caption: cosine similarity, (B,), in [-1, 1]."""
        image, text = self.embed(images, ids)
        return (image * text).sum(dim=-1)


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss: image i must pick caption i among the batch's captions, and caption i image i.

    ``logits[i, j]`` scores image i against caption j (Radford et al., Fig. 3's pseudocode).
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square (B, B), got {tuple(logits.shape)}")
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def clip_loss():
    """The ``loss_fn(model, batch, generator)`` for :func:`coursekit.training.train`, with batches of
    (images, token ids) as made by :func:`caption_tensors`."""

    def loss_fn(model: MiniCLIP, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        images, ids = batch[0], batch[1]
        return contrastive_loss(model(images, ids).float())

    return loss_fn


def caption_tensors(dataset, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A captioned dataset as training tensors: (images, token ids)."""
    return dataset.images, tokenizer.encode(dataset.captions)


@torch.no_grad()
def retrieval_accuracy(model: MiniCLIP, images: torch.Tensor, ids: torch.Tensor) -> float:
    """The share of images whose own caption scores highest among the given captions (a held-out check)."""
    logits = model(images, ids)
    same_caption = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)  # equal captions both count
    picked = logits.argmax(dim=1)
    return same_caption[torch.arange(len(ids)), picked].float().mean().item()
