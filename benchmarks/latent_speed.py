"""Latent against pixel space: the cost of a training step and of a sample (notebook 09).

    python benchmarks/latent_speed.py [--device auto] [--batch-size 128]

Both sides use the same loss, optimizer, batch size, sampler (DPM-Solver++(2M), 25 steps) and
classifier-free guidance (two model calls per step). The pixel side is the course U-Net on 1x16x16
digits; the latent side is ``latent_unet_config`` on 4x4x4 codes, and its sampling time includes
decoding the codes with the autoencoder. Untrained weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse

import torch

from coursekit.device import pick_device
from coursekit.latent import Autoencoder, latent_unet_config
from coursekit.losses import diffusion_loss
from coursekit.runs import generate
from coursekit.schedules import make_schedule
from coursekit.unet import UNet, UNetConfig, count_parameters

from common import machine, median_seconds


def training_step(model, images, labels, schedule):
    loss_fn = diffusion_loss(schedule, conditional=True, label_dropout=0.1, null_label=model.null_label)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss = loss_fn(model, (images, labels), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    schedule = make_schedule("linear", 1000)
    autoencoder = Autoencoder().to(device).eval()
    labels = (torch.arange(args.batch_size) % 10).to(device)
    sides = {
        "pixels (1x16x16)": (UNet(UNetConfig(in_channels=1, num_classes=10)), (1, 16, 16), lambda x: x),
        "codes (4x4x4)": (UNet(latent_unet_config(4), num_classes=10), (4, 4, 4), autoencoder.decode),
    }
    results = {}
    for name, (model, shape, decode) in sides.items():
        model = model.to(device)
        data = torch.randn(args.batch_size, *shape, device=device)
        train_seconds = median_seconds(training_step(model.train(), data, labels, schedule), repeats=10, warmup=3)
        model.eval()

        def sample(model=model, shape=shape, decode=decode):
            with torch.no_grad():
                codes, _ = generate(
                    model,
                    schedule,
                    shape,
                    100,
                    sampler="dpm++2m",
                    num_steps=25,
                    clip_x0=False,
                    class_labels=torch.arange(100) % 10,
                    guidance_scale=3.0,
                    progress=False,
                )
                decode(codes.to(device))

        sample_seconds = median_seconds(sample, repeats=3, warmup=1) / 100
        results[name] = (train_seconds, sample_seconds)
        print(
            f"{name}: {count_parameters(model) / 1e6:.2f} M params, {1000 * train_seconds:.1f} ms per training "
            f"step (batch {args.batch_size}), {1000 * sample_seconds:.2f} ms per sample"
        )
    (pixel_train, pixel_sample), (latent_train, latent_sample) = results.values()
    print(f"latent speed-up: training {pixel_train / latent_train:.1f}x, sampling {pixel_sample / latent_sample:.1f}x")


if __name__ == "__main__":
    main()
