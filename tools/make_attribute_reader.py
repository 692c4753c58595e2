"""Make the attribute reader that ships inside coursekit (coursekit/assets/glyphs_attribute_reader.pt).

    python tools/make_attribute_reader.py          # about 3 minutes on a 2-core CPU

Trains :class:`coursekit.attributes.AttributeReader` on 20,000 freshly drawn glyphs of every pair of colour
and character (:func:`coursekit.attributes.train_attribute_reader`, its recipe, fixed seed, fp32 on the CPU),
prints what it reads right on 2,000 other real glyphs, and keeps its weights in fp16. The notebooks and
benchmarks judge prompt adherence with it instead of spending minutes training a judge each time.
"""

from __future__ import annotations

import time

import torch

from coursekit.attributes import SHIPPED_READER, adherence, reader_recipe, train_attribute_reader
from coursekit.checkpoints import half_weights, save_checkpoint
from coursekit.glyphs import make_glyphs


def main() -> None:
    torch.manual_seed(0)
    started = time.perf_counter()
    reader = train_attribute_reader(20_000, reader_recipe(device="cpu"))
    minutes = (time.perf_counter() - started) / 60
    real = make_glyphs(2000, seed=99, split="any")
    shares = adherence(reader.read(real.images), real.scenes)
    read_right = ", ".join(f"{name} {share:.3f}" for name, share in shares.items())
    print(f"trained in {minutes:.1f} min; on 2,000 real glyphs: {read_right}")
    payload = {
        "weights": half_weights(reader.state_dict()),
        "reader_config": {"width": 32},
        "real_glyph_shares": shares,
        "made_by": "python tools/make_attribute_reader.py",
    }
    save_checkpoint(payload, SHIPPED_READER)
    print(f"wrote {SHIPPED_READER} ({SHIPPED_READER.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
