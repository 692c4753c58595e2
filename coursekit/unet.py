"""A U-Net that predicts noise: segmentation network in, noise predictor out (notebook 02).

The architecture follows DDPM Appendix B in miniature: residual blocks with GroupNorm, a
sinusoidal time embedding added inside every residual block, a down path and an up path joined
by skip connections, and self-attention at low resolution. Each block is its own small class so
that notebook 02 can build and shape-check them one at a time.

With ``context_dim`` set, the U-Net reads a prompt the way Stable Diffusion does (Rombach et al. 2022,
arXiv:2112.10752, Sec. 3.3): after each self-attention, a :class:`CrossAttention` block lets every pixel
attend to the prompt's token vectors, ``softmax(Q K^T / sqrt(d)) V`` with queries from the pixels and
keys and values from the tokens; padding tokens are masked out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coursekit.embeddings import sinusoidal_embedding


@dataclass
class UNetConfig:
    """The knobs of :class:`UNet`. The defaults suit 16x16 and 28x28 images on a CPU."""

    in_channels: int = 1  # 1 for grey images, 3 for colour
    base_channels: int = 32  # channels at full resolution
    channel_multipliers: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 1  # residual blocks per level on the way down (and up)
    attention_levels: tuple[int, ...] = (-1,)  # levels with self-attention: 0 = full size, -1 = lowest
    num_classes: int | None = None  # set to condition on class labels (adds a "no label" token)
    dropout: float = 0.0  # dropout inside residual blocks
    num_heads: int = 1  # attention heads
    context_dim: int | None = None  # set to read token vectors (a prompt) through cross-attention

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.attention_levels = tuple(self.attention_levels)
        if self.in_channels < 1 or self.base_channels < 1 or self.num_res_blocks < 1:
            raise ValueError("in_channels, base_channels and num_res_blocks must be positive")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers must be positive integers, got {self.channel_multipliers}")
        levels = len(self.channel_multipliers)
        bad = [level for level in self.attention_levels if not -levels <= level < levels]
        if bad:
            raise ValueError(f"attention_levels must lie in [{-levels}, {levels - 1}], got {bad}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None or positive, got {self.num_classes}")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be None or positive, got {self.context_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    def has_attention(self, level: int) -> bool:
        """Whether resolution ``level`` (0 = full size) gets self-attention; negative counts from the end."""
        levels = len(self.channel_multipliers)
        return level in self.attention_levels or level - levels in self.attention_levels


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count up to ``max_groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t, then a small MLP: (B,) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.frequency_dim = 2 * (dim // 4)  # an even number of sinusoidal features
        self.mlp = nn.Sequential(nn.Linear(self.frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.frequency_dim)  # float32, whatever t's type
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # a float64 (or half) U-Net works too


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and SiLU; the time embedding is added in between.

    (B, C_in, H, W) + (B, time_dim) -> (B, C_out, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Every pixel attends to every other pixel: (B, C, H, W) -> (B, C, H, W), with a residual."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.reshape(batch, 3, self.num_heads, channels // self.num_heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, C/heads)
        attended = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj(attended)


class CrossAttention(nn.Module):
    """Every pixel attends to the prompt's tokens: (B, C, H, W) and (B, L, D) -> (B, C, H, W), with a residual.

    Queries come from the pixels, keys and values from the token vectors (Rombach et al., Eq. 3);
    ``context_mask`` (B, L) is True for real tokens, and padding gets no attention. The last attention
    weights are kept in ``last_maps`` (B, heads, H * W, L): where each word looked. Under
    ``torch.enable_grad()`` they keep their graph, so that an energy read from them can be
    differentiated with respect to the input (self-guidance, coursekit.self_guidance).
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Linear(context_dim, channels)
        self.value = nn.Linear(context_dim, channels)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.last_maps: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        heads, head_dim = self.num_heads, channels // self.num_heads
        q = self.query(self.norm(x)).reshape(batch, heads, head_dim, height * width).transpose(-1, -2)
        k = self.key(context).reshape(batch, -1, heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
        v = self.value(context).reshape(batch, -1, heads, head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # (B, heads, HW, L)
        if context_mask is not None:
            scores = scores.masked_fill(~context_mask[:, None, None, :].to(scores.device), float("-inf"))
        weights = scores.softmax(dim=-1)
        self.last_maps = weights if torch.is_grad_enabled() else weights.detach()
        attended = (weights @ v).transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj(attended)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 convolution (odd sizes round up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Grow to a target size (the matching skip's): a 3x3 convolution, then nearest-neighbour resizing.

    The convolution runs before the resize, at the low resolution, where it costs a quarter as
    much; it also narrows the channels to the next level's width. The residual blocks that follow
    smooth the blocky resize, helped by the skip connection's fine detail.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.conv(x), size=size, mode="nearest")


class Level(nn.Module):
    """The residual blocks (and optional attention) of one resolution level."""

    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        num_blocks: int,
        time_dim: int,
        attention: bool,
        num_heads: int,
        dropout: float,
        context_dim: int | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(channels_in if i == 0 else channels_out, channels_out, time_dim, dropout)
            for i in range(num_blocks)
        )
        self.attention = nn.ModuleList(
            SelfAttention(channels_out, num_heads) if attention else nn.Identity() for _ in range(num_blocks)
        )
        reads_prompt = attention and context_dim is not None
        self.cross_attention = nn.ModuleList(
            CrossAttention(channels_out, context_dim, num_heads) for _ in range(num_blocks if reads_prompt else 0)
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, context=None, context_mask=None) -> torch.Tensor:
        for index, (block, attention) in enumerate(zip(self.blocks, self.attention)):
            x = attention(block(x, time_emb))
            if self.cross_attention:
                x = self.cross_attention[index](x, context, context_mask)
        return x


class UNet(nn.Module):
    """Predicts the noise in ``x_t`` (B, C, H, W) at timesteps ``t`` (B,); output shape = input shape.

    Works for any image size: the down path rounds odd sizes up, and the up path resizes to each
    skip connection's exact size. With ``num_classes`` set, pass ``class_labels`` (B,) in
    ``[0, num_classes]``; the extra index ``num_classes`` (``model.null_label``) means "no label",
    and is used when ``class_labels`` is None (classifier-free guidance needs it).

    The label reaches the network as a learned vector, ``class_embedding(label)``, added to the time
    embedding. ``condition`` (B, 4 * base_channels) passes such a vector directly instead: a blend
    of two labels' vectors, or what a text encoder would produce (notebook 09).
    """

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif overrides:
            config = UNetConfig(**{**config.to_dict(), **overrides})
        self.config = config
        channels = [config.base_channels * m for m in config.channel_multipliers]
        time_dim = 4 * config.base_channels

        # 1. Time (and class) embedding: (B,) -> (B, time_dim)
        self.time_embedding = TimeEmbedding(time_dim)
        self.class_embedding = nn.Embedding(config.num_classes + 1, time_dim) if config.num_classes else None
        # 2. Stem: image channels -> base channels
        self.stem = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        # 3. Down path: a level per resolution, halving the size between levels
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()

        def make_level(channels_in: int, channels_out: int, level: int) -> Level:
            attention = config.has_attention(level)
            return Level(
                channels_in, channels_out, config.num_res_blocks, time_dim, attention, config.num_heads,
                config.dropout, config.context_dim,
            )  # fmt: skip

        previous = channels[0]
        for level, width in enumerate(channels):
            self.down_levels.append(make_level(previous, width, level))
            if level < len(channels) - 1:
                self.downsamples.append(Downsample(width))
            previous = width
        # 4. Middle: residual block, attention, residual block at the lowest resolution
        self.middle_in = ResidualBlock(previous, previous, time_dim, config.dropout)
        self.middle_attention = SelfAttention(previous, config.num_heads)
        self.middle_cross = (
            CrossAttention(previous, config.context_dim, config.num_heads) if config.context_dim is not None else None
        )
        self.middle_out = ResidualBlock(previous, previous, time_dim, config.dropout)
        # 5. Up path: mirror of the down path; each level takes its skip connection (concatenated)
        self.upsamples = nn.ModuleList()
        self.up_levels = nn.ModuleList()
        for level in reversed(range(len(channels))):
            width = channels[level]
            if level < len(channels) - 1:
                self.upsamples.append(Upsample(previous, width))
                previous = width
            self.up_levels.append(make_level(previous + width, width, level))
            previous = width
        # 6. Head: back to image channels. Zero-initialised, so training starts from "predict 0".
        self.head_norm = group_norm(previous)
        self.head = nn.Conv2d(previous, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def null_label(self) -> int:
        """The class index that means "no label" (classifier-free guidance)."""
        if self.config.num_classes is None:
            raise ValueError("this UNet is unconditional: build it with num_classes=... for labels")
        return self.config.num_classes

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = self._check_inputs(x_t, t, class_labels)
        context, context_mask = self._check_context(x_t, context, context_mask)
        # 1. Embedding of t (plus the condition), shared by every residual block
        emb = self.time_embedding(t)  # (B, time_dim)
        if condition is not None:
            if class_labels is not None:
                raise ValueError("pass class_labels or a condition vector, not both")
            emb = emb + self._check_condition(condition, emb)  # any (B, time_dim) vector: notebook 09
        elif self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.null_label)
            emb = emb + self.class_embedding(class_labels.to(t.device).long())  # the label's learned vector
        # 2. Down path, remembering each level's output for the skip connections
        h = self.stem(x_t)  # (B, C0, H, W)
        skips = []
        for level, down_level in enumerate(self.down_levels):
            h = down_level(h, emb, context, context_mask)
            skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)  # (B, C, ceil(H/2), ceil(W/2))
        # 3. Middle
        h = self.middle_attention(self.middle_in(h, emb))
        if self.middle_cross is not None:
            h = self.middle_cross(h, context, context_mask)
        h = self.middle_out(h, emb)
        # 4. Up path: grow to the skip's size, concatenate it, refine
        for index, up_level in enumerate(self.up_levels):
            skip = skips.pop()
            if index > 0:
                h = self.upsamples[index - 1](h, size=skip.shape[-2:])
            h = up_level(torch.cat([h, skip], dim=1), emb, context, context_mask)
        # 5. Head
        return self.head(F.silu(self.head_norm(h)))  # (B, C_in, H, W)

    def _check_condition(self, condition: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.class_embedding is None:
            raise ValueError("condition given to an unconditional UNet; build it with num_classes=...")
        if condition.shape != emb.shape:
            raise ValueError(
                f"condition must be one embedding vector per image, shape {tuple(emb.shape)}, "
                f"got {tuple(condition.shape)}"
            )
        return condition.to(emb.device, emb.dtype)

    def _check_context(self, x_t: torch.Tensor, context, context_mask):
        if self.config.context_dim is None:
            if context is not None:
                raise ValueError("context given to a UNet without cross-attention; build it with context_dim=...")
            return None, None
        if context is None:
            raise ValueError(
                "this UNet reads a prompt: pass context (B, L, context_dim), the text encoder's token vectors "
                "(for 'no prompt', those of the empty prompt)"
            )
        expected = (x_t.shape[0], self.config.context_dim)
        if context.ndim != 3 or (context.shape[0], context.shape[2]) != expected:
            raise ValueError(f"context must have shape ({expected[0]}, L, {expected[1]}), got {tuple(context.shape)}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            shape = tuple(context.shape[:2])
            raise ValueError(f"context_mask must have shape {shape}, got {tuple(context_mask.shape)}")
        return context.to(x_t.dtype), None if context_mask is None else context_mask.bool()

    def cross_attention_maps(self) -> list[torch.Tensor]:
        """The attention weights of every cross-attention block from the last call, each (B, heads, H * W, L)."""
        blocks = [module for module in self.modules() if isinstance(module, CrossAttention)]
        return [block.last_maps for block in blocks if block.last_maps is not None]

    def word_maps(self, count: int | None = None) -> torch.Tensor:
        """Where each token looked in the last call, at the finest level with cross-attention: the weights
        averaged over the heads and that level's blocks, for the first ``count`` images of the batch (all by
        default), as (count, L, H, W). Under ``torch.enable_grad()`` they keep their graph."""
        maps = self.cross_attention_maps()
        if not maps:
            raise ValueError("no cross-attention weights yet: call the model with a prompt (context=...) first")
        positions = max(m.shape[2] for m in maps)
        side = math.isqrt(positions)
        finest = torch.stack([m[:count] for m in maps if m.shape[2] == positions]).mean(dim=(0, 2))  # (count, HW, L)
        return finest.transpose(1, 2).reshape(finest.shape[0], -1, side, side)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        channels = self.config.in_channels
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4 or x_t.shape[1] != channels:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(
                f"UNet expects images of shape (B, {channels}, H, W), got {shape}; "
                f"a single image needs a batch dimension (x[None])"
            )
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},), one timestep per image, got {tuple(t.shape)}")
        if class_labels is not None:
            if self.config.num_classes is None:
                raise ValueError("class_labels given to an unconditional UNet; build it with num_classes=...")
            class_labels = torch.as_tensor(class_labels)
            if class_labels.shape != (x_t.shape[0],):
                raise ValueError(f"class_labels must have shape ({x_t.shape[0]},), got {tuple(class_labels.shape)}")
            if int(class_labels.min()) < 0 or int(class_labels.max()) > self.config.num_classes:
                raise ValueError(
                    f"class_labels must lie in [0, {self.config.num_classes}] "
                    f"({self.config.num_classes} means 'no label')"
                )
        return t


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
