"""The tiny training run shared by tests/test_distributed.py and tests/distributed_run.py."""

import torch

from coursekit.losses import diffusion_loss
from coursekit.schedules import make_schedule
from coursekit.training import TrainConfig
from coursekit.unet import UNet

GLOBAL_BATCH = 16


def make_run(steps: int, micro_batches: int):
    """A small U-Net, 64 fixed random 8x8 images with labels, the conditional diffusion loss."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_multipliers=(1, 2), num_classes=4)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(64, 1, 8, 8, generator=generator) * 2 - 1
    labels = torch.randint(0, 4, (64,), generator=generator)
    loss_fn = diffusion_loss(make_schedule("cosine", 100), conditional=True, label_dropout=0.2, null_label=4)
    config = TrainConfig(
        max_steps=steps,
        batch_size=GLOBAL_BATCH,
        micro_batches=micro_batches,
        learning_rate=1e-3,
        warmup_steps=2,
        precision="fp32",
        device="cpu",
        log_every=2,
        checkpoint_every_steps=None,
        checkpoint_every_minutes=None,
        progress=True,
    )
    return model, (images, labels), loss_fn, config
