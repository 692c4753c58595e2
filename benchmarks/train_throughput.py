"""Training throughput of the course's U-Net, with a breakdown of one step.

    python benchmarks/train_throughput.py [--size 16] [--batch-size 128] [--device auto]

Where diffusers is installed (pip install -e ".[diffusers]"), its UNet2DModel at a matched
parameter count and resolution is measured in the same run and the ratio printed.
"""

from __future__ import annotations

import argparse
import time

import torch

from coursekit.device import pick_device
from coursekit.losses import diffusion_loss
from coursekit.schedules import make_schedule
from coursekit.training import EMA, TensorBatches, make_generator, precision_context
from coursekit.unet import UNet, UNetConfig, count_parameters

from common import machine


def step_breakdown(model, images, batch_size, device, precision, repeats):
    """Seconds per step of each part: batch, forward (loss), backward, optimizer, EMA."""
    schedule = make_schedule("cosine", 1000)
    loss_fn = diffusion_loss(schedule)
    generator = make_generator(device, 0)
    batches = TensorBatches((images,), batch_size, device, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, 0.999)
    parts = {"batch": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "ema": 0.0}

    def timed(name, function):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        parts[name] += time.perf_counter() - start
        return result

    def one_step():
        batch = timed("batch", lambda: next(batches))
        with precision_context(device, precision):
            loss = timed("forward", lambda: loss_fn(model, batch, generator))
        optimizer.zero_grad(set_to_none=True)
        timed("backward", loss.backward)
        timed("optimizer", optimizer.step)
        timed("ema", lambda: ema.update(model, 1000))

    for _ in range(3):
        one_step()
    parts = dict.fromkeys(parts, 0.0)
    for _ in range(repeats):
        one_step()
    return {name: seconds / repeats for name, seconds in parts.items()}


class DiffusersWrapper(torch.nn.Module):
    """UNet2DModel behind the course's model signature ``model(x_t, t) -> eps``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, t, class_labels=None):
        return self.model(x_t, t).sample


def matched_diffusers_unet(target_parameters: int, size: int):
    """The UNet2DModel with the same resolution levels and attention placement, width matched."""
    from diffusers import UNet2DModel

    best = None
    for width in range(8, 129, 4):
        model = UNet2DModel(
            sample_size=size,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(width, 2 * width, 2 * width),
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        )
        gap = abs(count_parameters(model) - target_parameters)
        if best is None or gap < best[0]:
            best = (gap, model)
    return DiffusersWrapper(best[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    images = torch.rand(2000, 1, args.size, args.size) * 2 - 1
    print(f"machine: {machine()}")
    print(f"images {args.size}x{args.size}, batch {args.batch_size}, {args.repeats} timed steps")

    ours = UNet(UNetConfig(in_channels=1)).to(device)
    candidates = {"coursekit UNet": ours}
    try:
        candidates["diffusers UNet2DModel"] = matched_diffusers_unet(count_parameters(ours), args.size).to(device)
    except ImportError:
        print("diffusers is not installed: pip install -e '.[diffusers]' to compare with UNet2DModel")

    precisions = ["fp32"] + (["bf16"] if device.type in ("cpu", "cuda") else [])
    results = {}
    for name, model in candidates.items():
        for precision in precisions:
            parts = step_breakdown(model, images, args.batch_size, device, precision, args.repeats)
            total = sum(parts.values())
            results[name, precision] = args.batch_size / total
            breakdown = ", ".join(f"{part} {1000 * seconds:.1f} ms" for part, seconds in parts.items())
            print(
                f"{name:>22} ({count_parameters(model) / 1e6:.2f} M params) {precision}: "
                f"{args.batch_size / total:7.0f} img/s  [{breakdown}]"
            )
    if len(candidates) > 1:
        for precision in precisions:
            ratio = results["coursekit UNet", precision] / results["diffusers UNet2DModel", precision]
            print(f"throughput ratio coursekit / diffusers ({precision}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
