"""Property-based tests (hypothesis): compressors against the paper's definitions, and the scan."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from storm_lightning.compressors import SpatialAveragePool, TemporalAveragePool, TemporalSample
from storm_lightning.ops import selective_scan, selective_scan_reference

SETTINGS = settings(max_examples=40, deadline=None)
side = st.integers(1, 4)


def clip(seed, frames, h, w, dim=3):
    return torch.randn(2, frames, h * w, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@SETTINGS
@given(seed=st.integers(0, 2**16), frames=st.integers(1, 40), k=st.integers(1, 9), h=side, w=side)
def test_temporal_pool_is_the_mean_of_each_group(seed, frames, k, h, w):
    x = clip(seed, frames, h, w)
    out, grid = TemporalAveragePool(k)(x, (h, w))
    assert out.shape[1] == math.ceil(frames / k) and grid == (h, w)
    for t in range(out.shape[1]):  # X_time-avg[t] = mean of frames tk .. tk+k-1 (fewer in the last group)
        torch.testing.assert_close(out[:, t], x[:, t * k: (t + 1) * k].mean(1))


@SETTINGS
@given(seed=st.integers(0, 2**16), frames=st.integers(1, 40), k=st.integers(1, 6), s=st.integers(1, 6))
def test_pool_then_sample_matches_the_paper(seed, frames, k, s):
    """TemporalAveragePool(k) then TemporalSample(s): output j is the mean of frames j*s*k .. j*s*k+k-1."""
    x = clip(seed, frames, 2, 2)
    pooled, grid = TemporalAveragePool(k)(x, (2, 2))
    out, _ = TemporalSample(s).eval()(pooled, grid)
    assert out.shape[1] == math.ceil(math.ceil(frames / k) / s)
    for j in range(out.shape[1]):
        start = j * s * k
        torch.testing.assert_close(out[:, j], x[:, start: start + k].mean(1))


@SETTINGS
@given(seed=st.integers(0, 2**16), frames=st.integers(1, 40), s=st.integers(1, 9))
def test_temporal_sample_keeps_every_sth_frame(seed, frames, s):
    x = clip(seed, frames, 2, 3)
    out, _ = TemporalSample(s).eval()(x, (2, 3))
    torch.testing.assert_close(out, x[:, [t for t in range(frames) if t % s == 0]])


@SETTINGS
@given(seed=st.integers(0, 2**16), frames=st.integers(1, 6), p=st.integers(1, 4), bh=side, bw=side)
def test_spatial_pool_is_the_mean_of_each_block(seed, frames, p, bh, bw):
    h, w = p * bh, p * bw
    x = clip(seed, frames, h, w)
    out, grid = SpatialAveragePool(p)(x, (h, w))
    assert grid == (bh, bw) and out.shape == (2, frames, bh * bw, 3)
    grid_x = x.view(2, frames, h, w, 3)
    for i in range(bh):
        for j in range(bw):
            block = grid_x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].mean((2, 3))
            torch.testing.assert_close(out[:, :, i * bw + j], block)


@SETTINGS
@given(value=st.floats(-1e3, 1e3, allow_nan=False), frames=st.integers(1, 20), k=st.integers(1, 5),
       p=st.integers(1, 3))
def test_pooling_a_constant_gives_the_constant(value, frames, k, p):
    x = torch.full((1, frames, (2 * p) ** 2, 4), value, dtype=torch.float64)
    for compressor in (TemporalAveragePool(k), SpatialAveragePool(p), TemporalSample(k).eval()):
        out, _ = compressor(x, (2 * p, 2 * p))
        torch.testing.assert_close(out, torch.full_like(out, value))


@SETTINGS
@given(seed=st.integers(0, 2**16), b=st.integers(1, 2), d=st.integers(1, 5), n=st.integers(1, 5),
       length=st.integers(1, 130), chunk=st.sampled_from([None, 1, 3, 8, 32]),
       delta_scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_scan_matches_the_definition(seed, b, d, n, length, chunk, delta_scale):
    g = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) * 5
    B, C = (torch.randn(b, n, length, generator=g) for _ in range(2))
    D = torch.randn(d, generator=g)
    y, last = selective_scan(u, delta * delta_scale, A, B, C, D, z, delta_softplus=True, return_last_state=True,
                             chunk_size=chunk)
    y_ref, last_ref = selective_scan_reference(u.double(), (delta * delta_scale).double(), A.double(), B.double(),
                                               C.double(), D.double(), z.double(), delta_softplus=True,
                                               return_last_state=True)
    assert y.shape == (b, d, length) and last.shape == (b, d, n)
    assert torch.isfinite(y).all()
    # error within 1e-5 of the largest output, plus 1e-6: fp32 leaves an absolute error of ~1e-7 times the
    # size of the terms, even where they cancel to a tiny output (hypothesis found y ~ 2.6e-5 at length 1,
    # and a small y among outputs of ~100 with delta ~ 90)
    for ours, ref in ((y, y_ref), (last, last_ref)):
        assert (ours.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
