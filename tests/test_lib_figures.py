"""save_figure: the file matplotlib's own tight_layout + savefig writes, from one draw."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imread

from weight_geometry.figures import pyplot, save_figure


def _figure():
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(6, 3))
    left.plot([0, 1, 2], [1, 0, 2], label="a")
    left.set_title("a title")
    left.legend()
    fig.colorbar(right.imshow(np.arange(12.0).reshape(3, 4)), ax=right, label="value")
    return fig


def test_save_figure_draws_once_and_writes_the_plain_savefig_pixels(tmp_path, monkeypatch):
    reference = _figure()
    reference.tight_layout()
    reference.savefig(tmp_path / "reference.png", dpi=110)
    pyplot().close(reference)

    draws, draw = [], Figure.draw

    def counted_draw(fig, renderer):
        draws.append(fig)
        return draw(fig, renderer)

    monkeypatch.setattr(Figure, "draw", counted_draw)
    save_figure(_figure(), tmp_path / "new" / "ours.png")
    assert len(draws) == 1
    ours, expected = imread(tmp_path / "new" / "ours.png"), imread(tmp_path / "reference.png")
    assert ours.shape == expected.shape and np.array_equal(ours, expected)
