"""The PyTorch selective scan against the step-by-step float64 definition."""

import pytest
import torch

from storm_lightning.ops import selective_scan, selective_scan_reference


def make_inputs(b, d, n, l, dtype=torch.float32, delta_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(b, d, l), delta=r(b, d, l) * delta_scale, A=-torch.rand(d, n, generator=g, dtype=dtype) * 4,
        B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d) * 0.5,
    )


def assert_rel_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("length", [1, 7, 31, 33, 100, 257, 1000])
@pytest.mark.parametrize("chunk_size", [None, 4, 16])
def test_matches_reference_fp32(length, chunk_size):
    x = make_inputs(2, 6, 4, length)
    y, last = selective_scan(**x, delta_softplus=True, return_last_state=True, chunk_size=chunk_size)
    y_ref, last_ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                               return_last_state=True)
    assert y.shape == (2, 6, length) and y.dtype == torch.float32
    assert_rel_close(y, y_ref)
    assert_rel_close(last, last_ref)


def test_optional_arguments_are_optional():
    x = make_inputs(1, 3, 2, 20)
    y = selective_scan(x["u"], x["delta"].abs(), x["A"], x["B"], x["C"])
    y_ref = selective_scan_reference(x["u"].double(), x["delta"].abs().double(), x["A"].double(), x["B"].double(),
                                     x["C"].double())
    assert_rel_close(y, y_ref)


def test_very_long_sequence():
    """128 frames x 256 tokens in one scan."""
    x = make_inputs(1, 4, 4, 128 * 256)
    y = selective_scan(**x, delta_softplus=True)
    y_ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert_rel_close(y, y_ref)


def test_large_delta_times_A_is_stable():
    """delta * A down to about -1000 per step: decays underflow to 0, nothing overflows."""
    x = make_inputs(2, 4, 4, 300, delta_scale=60.0)
    y = selective_scan(**x, delta_softplus=True)
    y_ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert_rel_close(y, y_ref)


def test_float64_in_float64_out():
    x = make_inputs(1, 3, 2, 50, dtype=torch.float64)
    y = selective_scan(**x, delta_softplus=True)
    assert y.dtype == torch.float64
    assert_rel_close(y, selective_scan_reference(**x, delta_softplus=True), rel=1e-12)


def test_gradcheck():
    x = make_inputs(1, 2, 3, 11, dtype=torch.float64)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    inputs = tuple(x[k].requires_grad_() for k in names)

    def f(*args):
        return selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True, chunk_size=4)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_gradients_match_reference():
    x = make_inputs(2, 4, 3, 70)
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    xr = {k: v.double().requires_grad_() for k, v in x.items()}
    w = torch.randn(2, 4, 70)
    (selective_scan(**xs, delta_softplus=True) * w).sum().backward()
    (selective_scan_reference(**xr, delta_softplus=True) * w.double()).sum().backward()
    for k in x:
        assert_rel_close(xs[k].grad, xr[k].grad, rel=1e-4)
