"""A slider that redraws a figure, with a static picture for viewers that cannot run widgets.

Used where moving a slider teaches more than a paragraph: the noise level in notebook 01, the
timestep of the three experiments in notebook 04. In JupyterLab, Notebook, VS Code or Colab
the slider is live. Where no widget front end is attached (a notebook viewed on GitHub, a PDF
export, a test run) the same output carries a PNG of the figure at the slider's first value,
and the viewer shows that instead.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable


def figure_to_png(figure) -> bytes:
    """The figure as PNG bytes (closed afterwards, so it is not drawn a second time)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


class SliderFigure:
    """A slider over ``values`` and a figure drawn by ``draw(value) -> matplotlib Figure``."""

    def __init__(self, draw: Callable, values: list, description: str = "value", start=None):
        import ipywidgets

        if not values:
            raise ValueError("the slider needs at least one value")
        self.draw = draw
        self.values = list(values)
        start = self.values[0] if start is None else start
        if start not in self.values:
            raise ValueError(f"start {start!r} is not one of the slider's values")
        self.slider = ipywidgets.SelectionSlider(
            options=self.values, value=start, description=description, continuous_update=False
        )
        self.image = ipywidgets.Image(format="png", value=figure_to_png(draw(start)))
        self.slider.observe(self._redraw, names="value")
        self.widget = ipywidgets.VBox([self.slider, self.image])
        self.static_png = self.image.value

    def _redraw(self, change) -> None:
        self.image.value = figure_to_png(self.draw(change["new"]))

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        if isinstance(bundle, tuple):  # some ipywidgets versions return (data, metadata)
            bundle = bundle[0]
        bundle = dict(bundle)
        bundle["image/png"] = base64.b64encode(self.static_png).decode("ascii")
        bundle["text/plain"] = f"<slider over {len(self.values)} values; a static figure where widgets cannot run>"
        return bundle
