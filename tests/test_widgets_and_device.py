import base64

import matplotlib.pyplot as plt
import pytest
import torch

from coursekit.device import environment_report, pick_device, supports_native_bf16
from coursekit.widgets import SliderFigure


def _draw(value):
    figure, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, value])
    return figure


def test_slider_figure_redraws_and_carries_a_static_picture():
    slider = SliderFigure(_draw, [1, 2, 3], description="t")
    bundle = slider._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    assert "application/vnd.jupyter.widget-view+json" in bundle
    before = slider.image.value
    slider.slider.value = 3
    assert slider.image.value != before  # the observer redrew the figure
    with pytest.raises(ValueError, match="not one of"):
        SliderFigure(_draw, [1, 2], start=5)


def test_device_choice_and_report():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in ("cuda", "mps", "cpu")
    assert not supports_native_bf16(torch.device("cpu"))
    with pytest.raises(ValueError, match="choose one of"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    assert "torch" in environment_report() and "device:" in environment_report()
