"""Self-guidance: move and resize what a word paints, read from the model's own attention (notebook 11).

Epstein et al. 2023 (arXiv:2306.00986) observe that a text-to-image model's cross-attention maps say
where each word's object is. Properties of a word's map A_k (H x W) are differentiable functions of the
noisy image, so sampling can be guided towards a wanted value of them (their Eq. 3, with this package's
gradient guidance, coursekit.guidance):

    shape_k    = sigmoid(s * (A_k / max A_k - 1/2))              a soft threshold of the map (s: sharpness)
    size_k     = mean over positions of shape_k                  the share of the image the object covers
    centroid_k = sum_{h,w} (x_w, y_h) A_k[h, w] / sum A_k        where it sits, x and y in [0, 1]

    move:   E = | centroid_k - target |_1             resize: E = | size_k - factor * size_k(unguided) |

The resize target is relative: the same prompt and noise are first painted without guidance, and that
run's sizes, step by step, are what ``factor`` multiplies.
No training, no extra model: the guidance is the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coursekit.latent import decode_latents
from coursekit.prompts import with_prompt_guidance
from coursekit.samplers import get_sampler

SHARPNESS = 10.0  # of the soft threshold: a map at its maximum counts 0.99, one at zero 0.007


# ----------------------------------------------------------------------------- properties of a map


def _check_maps(maps: torch.Tensor) -> None:
    if maps.ndim != 3:
        raise ValueError(f"attention maps must have shape (B, H, W), got {tuple(maps.shape)}")


def centroid(maps: torch.Tensor) -> torch.Tensor:
    """Where each map's weight sits: (B, 2), (x, y) of pixel centres in [0, 1], x to the right, y down."""
    _check_maps(maps)
    height, width = maps.shape[-2:]
    ys = (torch.arange(height, device=maps.device, dtype=maps.dtype) + 0.5) / height
    xs = (torch.arange(width, device=maps.device, dtype=maps.dtype) + 0.5) / width
    total = maps.sum(dim=(1, 2)).clamp_min(1e-12)
    x = (maps.sum(dim=1) * xs).sum(dim=1) / total  # weight of each column times its x
    y = (maps.sum(dim=2) * ys).sum(dim=1) / total
    return torch.stack([x, y], dim=1)


def shape(maps: torch.Tensor, sharpness: float = SHARPNESS) -> torch.Tensor:
    """A soft threshold at half each map's maximum: about 1 on the object, about 0 elsewhere. (B, H, W)."""
    _check_maps(maps)
    peak = maps.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return torch.sigmoid(sharpness * (maps / peak - 0.5))


def size(maps: torch.Tensor, sharpness: float = SHARPNESS) -> torch.Tensor:
    """The share of positions each map's object covers: (B,), in [0, 1]."""
    return shape(maps, sharpness).mean(dim=(1, 2))


# ----------------------------------------------------------------------------- edits and their energies


@dataclass(frozen=True)
class Move:
    """Move the object of ``word`` so that its centroid lands at ``to`` = (x, y), each in [0, 1].
    ``word`` may name several words of the prompt ("green 3"): their maps are averaged."""

    word: str
    to: tuple[float, float]
    keep_size: bool = False  # also hold the object's size at the unguided run's (a move, not a resize)


@dataclass(frozen=True)
class Resize:
    """Scale the area the object of ``word`` (one word or several) covers by ``factor`` (2: twice the area)."""

    word: str
    factor: float


def word_index(caption: str, word: str) -> int:
    """The token position of ``word`` in ``caption`` (the course's tokenizer has one token per word)."""
    words = caption.split()
    if word not in words:
        raise ValueError(f"{word!r} is not a word of the prompt {caption!r}; choose one of {words}")
    return words.index(word)


def edit_energy(edit: Move | Resize, maps: torch.Tensor, reference_size: torch.Tensor | None = None) -> torch.Tensor:
    """The energy of one edit for a batch of one word's maps (B, H, W): (B,), zero when it is met."""
    if isinstance(edit, Move):
        target = torch.tensor(edit.to, device=maps.device, dtype=maps.dtype)
        energy = (centroid(maps) - target).abs().sum(dim=1)
        if edit.keep_size:
            if reference_size is None:
                raise ValueError("a Move that keeps its size needs the unguided run's sizes (reference_size)")
            energy = energy + (size(maps) - reference_size).abs()
        return energy
    if isinstance(edit, Resize):
        if reference_size is None:
            raise ValueError("a Resize needs the unguided run's sizes (reference_size)")
        return (size(maps) - edit.factor * reference_size).abs()
    raise TypeError(f"unknown edit {edit!r}; use Move or Resize")


# ----------------------------------------------------------------------------- guided sampling


@dataclass
class SelfGuided:
    """Both runs of :func:`self_guided_generate`, from the same noise."""

    unguided: torch.Tensor  # (N, 3, 32, 32) in [-1, 1]
    guided: torch.Tensor
    unguided_energies: torch.Tensor  # (steps, N): each edit's energy, read from the maps at every step
    guided_energies: torch.Tensor


def _edit_energies(edits: list, maps: torch.Tensor, reference_sizes: torch.Tensor) -> torch.Tensor:
    """Each image's edit energy (0 where it has no edit): (N,)."""
    energies = [
        edit_energy(edit, maps[i : i + 1], reference_sizes[i : i + 1])[0] if edit is not None else maps.new_zeros(())
        for i, edit in enumerate(edits)
    ]
    return torch.stack(energies)


@torch.no_grad()
def self_guided_generate(
    pipeline,
    captions: list[str],
    edits: list[Move | Resize | None],
    weight: float = 1.0,
    guidance_scale: float = 3.0,
    num_steps: int = 25,
    seed: int = 0,
    guided_steps: tuple[float, float] = (0.0, 0.6),
) -> SelfGuided:
    """Paint ``captions`` twice from the same noise, without and with self-guidance (DDIM, classifier-free
    guidance on the prompts). ``pipeline`` is a :class:`coursekit.text_to_image.TextToImage`.

    ``edits[i]`` is the edit for image i (or None). Each guided step adds ``weight * sigma_t * g / rms(g)``
    to the noise guess, g the gradient of the edit's energy: the gradient is scaled to unit root mean
    square per image, so that ``weight`` reads as "how many noise units to push" whatever the energy's
    scale. With a move's L1 energy this means the push does not shrink as the map nears its target: the
    target sets the direction, the weight the strength (docs/benchmarks.md, controlled generation). Only
    the steps in the share ``guided_steps`` of the run are guided (the layout forms early; the last steps
    are left to clean up). ``weight = 0`` paints the unguided images twice.
    """
    if len(edits) != len(captions):
        raise ValueError(f"{len(captions)} prompts but {len(edits)} edits; give one edit (or None) per prompt")
    unet, schedule, count = pipeline.unet, pipeline.schedule, len(captions)
    device = next(unet.parameters()).device
    # which tokens each edit reads: its words' positions, as weights that average their maps
    token_weights = torch.zeros(count, pipeline.prompts.tokenizer.max_length, device=device)
    for i, (caption, edit) in enumerate(zip(captions, edits)):
        if edit is not None:
            positions = [word_index(caption, word) for word in edit.word.split()]
            token_weights[i, positions] = 1 / len(positions)
    active = torch.tensor([e is not None for e in edits], device=device).view(-1, 1, 1, 1)
    prompted = with_prompt_guidance(unet, pipeline.prompts.to(device), list(captions), guidance_scale)
    reference_sizes: list[torch.Tensor] = []  # the unguided run's size of each edited word, step by step
    energies: dict[bool, list[torch.Tensor]] = {False: [], True: []}

    def predictor(guided: bool):
        step = 0

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal step
            guiding = guided and weight != 0 and guided_steps[0] * num_steps <= step < guided_steps[1] * num_steps
            with torch.enable_grad() if guiding else torch.no_grad():
                x = x_t.detach().requires_grad_(guiding)
                eps = prompted(x, t).detach()
                maps = torch.einsum("nlhw,nl->nhw", unet.word_maps(count), token_weights)  # the prompted half
                if not guided:
                    reference_sizes.append(size(maps).detach())
                energy = _edit_energies(edits, maps, reference_sizes[step])
                energies[guided].append(energy.detach().cpu())
                step += 1
                if not guiding:
                    return eps
                (gradient,) = torch.autograd.grad(energy.sum(), x)
            rms = gradient.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
            sigma = (1 - schedule.at(schedule.alpha_bar, t, like=x_t)).sqrt()  # sqrt(1 - alpha_bar_t)
            return eps + weight * sigma * gradient / rms * active

        return predict

    x_T = torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(device)
    images = []
    trainable = [parameter.requires_grad for parameter in unet.parameters()]
    unet.requires_grad_(False)  # the gradient flows to the image only
    try:
        for guided in (False, True):  # unguided first: it gives the reference sizes
            *_, last = get_sampler("ddim")(predictor(guided), schedule, x_T, num_steps=num_steps, clip_x0=False)
            images.append(decode_latents(pipeline.autoencoder, last.x, pipeline.latent_scale))
    finally:
        for parameter, flag in zip(unet.parameters(), trainable):
            parameter.requires_grad_(flag)
    return SelfGuided(images[0], images[1], torch.stack(energies[False]), torch.stack(energies[True]))


# ----------------------------------------------------------------------------- measuring what moved


def ink_mask(images: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Where a glyph image has ink: (B, H, W) booleans, a pixel whose brightest channel is above
    ``threshold`` (the glyphs' background is black, -1)."""
    return images.amax(dim=1) > threshold


def ink_centroid_and_area(images: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The centroid (B, 2) in [0, 1] of each image's ink ((0, 0) where there is none) and the share of the
    image it covers (B,). The glyphs are drawn by code on black, so this is the truth, not a model's guess."""
    ink = ink_mask(images, threshold).to(torch.float64)
    return centroid(ink), ink.mean(dim=(1, 2))
