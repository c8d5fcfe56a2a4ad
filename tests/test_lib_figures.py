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


def test_ratio_heatmaps_mask_the_diagonal_and_centre_the_colours_on_the_null():
    from weight_geometry.figures import off_diagonal_ratio, ratio_limit

    values = np.array([[1.0, 0.2, 0.05], [0.2, 1.0, 0.1], [0.05, 0.1, 1.0]])
    ratio = off_diagonal_ratio(values, np.full((3, 3), 0.1))
    assert np.isnan(np.diagonal(ratio)).all()        # a layer against itself is not coloured
    assert np.allclose(ratio[[0, 0, 1], [1, 2, 2]], [2.0, 0.5, 1.0])
    assert ratio_limit(ratio) == 2.0                 # [0.5, 2]: log-symmetric around 1
    assert ratio_limit(ratio * 3) == 6.0
    assert ratio_limit(np.full((2, 2), np.nan)) == 2.0
