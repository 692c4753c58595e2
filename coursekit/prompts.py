"""Text to image: a U-Net that reads a prompt, trained with prompts dropped, sampled with guidance.

The pieces come from elsewhere: the tokenizer and text encoder of :mod:`coursekit.text` (trained as
a mini-CLIP, then frozen, as Stable Diffusion freezes CLIP), the U-Net's cross-attention
(:class:`coursekit.unet.CrossAttention`), the noise-prediction loss of :mod:`coursekit.losses`. This
module joins them:

- :class:`PromptEncoder` turns captions into the token vectors and mask the U-Net's cross-attention
  reads; it never trains;
- :func:`prompt_loss` is the course's diffusion loss with a share of the prompts replaced by the empty
  prompt, so that one model learns both "this prompt" and "no prompt" (Ho & Salimans 2022, Algorithm 1,
  with the empty caption as the null condition, as Stable Diffusion does);
- :func:`with_prompt_guidance` mixes the two predictions at sampling time,
  ``eps = eps(no prompt) + w (eps(prompt) - eps(no prompt))``, one batched call per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coursekit.losses import noise_prediction_loss
from coursekit.schedules import NoiseSchedule
from coursekit.text import TextEncoder, Tokenizer


@dataclass
class PromptEncoder:
    """A frozen text encoder with its tokenizer: captions -> (token vectors (B, L, D), mask (B, L))."""

    tokenizer: Tokenizer
    text: TextEncoder

    def __post_init__(self) -> None:
        self.text.eval().requires_grad_(False)

    @property
    def context_dim(self) -> int:
        """The size of each token vector: the U-Net's ``context_dim``."""
        return self.text.config.width

    def ids(self, captions: str | list[str]) -> torch.Tensor:
        return self.tokenizer.encode(captions)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors and mask (True for real tokens, the end token included) for token ids (B, L)."""
        device = next(self.text.parameters()).device
        tokens, _ = self.text(ids.to(device))
        return tokens, ids.to(device) != self.tokenizer.pad_id

    def encode(self, captions: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(self.ids(captions))

    def to(self, device: str | torch.device) -> PromptEncoder:
        self.text.to(device)
        return self


def drop_prompts(ids: torch.Tensor, probability: float, empty_ids: torch.Tensor, generator=None) -> torch.Tensor:
    """Replace each caption by the empty one with the given probability (the "no prompt" condition)."""
    if not 0 <= probability < 1:
        raise ValueError(f"probability must lie in [0, 1), got {probability}")
    draw_device = generator.device if generator is not None else ids.device
    drop = (torch.rand(ids.shape[0], generator=generator, device=draw_device) < probability).to(ids.device)
    return torch.where(drop[:, None], empty_ids.to(ids.device).expand_as(ids), ids)


def prompt_loss(schedule: NoiseSchedule, prompts: PromptEncoder, drop_probability: float = 0.1):
    """The ``loss_fn(model, batch, generator)`` for :func:`coursekit.training.train`: batches are
    (images or latent codes, token ids); the model is called as ``model(x_t, t, context=, context_mask=)``."""
    empty_ids = prompts.ids("")

    def loss_fn(model, batch: tuple, generator: torch.Generator | None = None) -> torch.Tensor:
        if len(batch) < 2:
            raise ValueError("text-to-image training needs (images, token ids) batches")
        x0, ids = batch[0], drop_prompts(batch[1], drop_probability, empty_ids, generator)
        context, mask = prompts.to(x0.device)(ids)  # the frozen encoder follows the batch to its device

        def reads_the_prompt(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x_t, t, context=context.to(x_t.dtype), context_mask=mask)

        return noise_prediction_loss(reads_the_prompt, x0, schedule, generator=generator)

    return loss_fn


def with_prompt_guidance(model, prompts: PromptEncoder, captions: list[str], guidance_scale: float = 1.0):
    """Bind prompts to a text-conditioned model, with classifier-free guidance on prompts.

    ``eps = eps(empty) + w * (eps(prompt) - eps(empty))``: w = 1 follows the prompt plainly (one call a
    step), w = 0 ignores it, w > 1 pushes harder towards it. The result has the samplers' signature
    ``(x_t, t) -> eps``, for as many images as ``captions``.
    """
    context, mask = prompts.encode(captions)
    empty_context, empty_mask = prompts.encode([""] * len(captions))

    def guided_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.shape[0] != len(captions):
            raise ValueError(f"{len(captions)} prompts for a batch of {x_t.shape[0]} images")
        cond, cond_mask = context.to(x_t.device, x_t.dtype), mask.to(x_t.device)
        if guidance_scale == 1.0:
            return model(x_t, t, context=cond, context_mask=cond_mask)
        both = torch.cat([cond, empty_context.to(x_t.device, x_t.dtype)])
        both_mask = torch.cat([cond_mask, empty_mask.to(x_t.device)])
        eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), context=both, context_mask=both_mask)
        eps_prompt, eps_empty = eps.chunk(2)
        return eps_empty + guidance_scale * (eps_prompt - eps_empty)

    return guided_model
