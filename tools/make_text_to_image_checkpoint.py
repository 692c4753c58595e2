"""Make the miniature Stable Diffusion that ships inside coursekit (coursekit/assets/glyphs_text_to_image.pt).

    python tools/make_text_to_image_checkpoint.py                              # about 14 minutes on a 2-core CPU
    python tools/make_text_to_image_checkpoint.py --run runs/text-to-image     # keep (or reuse) the run folder

Trains the three parts with the course's recipe (coursekit.text_to_image.TextToImageConfig: mini-CLIP,
autoencoder, U-Net with cross-attention), reproducibly (fixed seed, fp32 on the CPU), or resumes them
from --run, then keeps the three parts' EMA weights in fp16 in one file. With it,
``coursekit sample --run shipped-text-to-image --prompt "a small green 4 on the right" --guidance 3``
paints without training.
"""

from __future__ import annotations

import argparse
import tempfile

from coursekit.checkpoints import save_checkpoint
from coursekit.runs import SHIPPED_TEXT_TO_IMAGE_CHECKPOINT
from coursekit.text_to_image import TextToImageConfig, bundle_parts, train_text_to_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder to train into or resume (default: a temporary one)")
    run = parser.parse_args().run
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = run or scratch
        train_text_to_image(run_dir, TextToImageConfig(precision="fp32", device="cpu"))
        bundle = {**bundle_parts(run_dir), "made_by": "python tools/make_text_to_image_checkpoint.py"}
    save_checkpoint(bundle, SHIPPED_TEXT_TO_IMAGE_CHECKPOINT)
    size = SHIPPED_TEXT_TO_IMAGE_CHECKPOINT.stat().st_size / 1e6
    print(f"wrote {SHIPPED_TEXT_TO_IMAGE_CHECKPOINT} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
