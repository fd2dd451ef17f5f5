"""The selective scan on the CPU, both paths (numba's fused loops and the chunked PyTorch scan), against
the step-by-step float64 definition."""

import os
import subprocess
import sys

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


def _scan_module():
    import importlib

    return importlib.import_module("storm_lightning.ops.selective_scan")  # the package exports the function


@pytest.fixture(params=["numba", "chunked"])
def scan_path(request, monkeypatch):
    """Each test with this fixture runs on both CPU paths (numba is a dependency: it must be there)."""
    scan = _scan_module()
    monkeypatch.setattr(scan, "CPU_KERNEL", request.param == "numba")
    assert request.param == "chunked" or scan._cpu_kernel() is not None
    return request.param


def assert_rel_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("length", [1, 7, 31, 33, 100, 257, 1000])
@pytest.mark.parametrize("chunk_size", [None, 4, 16])
def test_matches_reference_fp32(scan_path, length, chunk_size):
    x = make_inputs(2, 6, 4, length)
    y, last = selective_scan(**x, delta_softplus=True, return_last_state=True, chunk_size=chunk_size)
    y_ref, last_ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True,
                                               return_last_state=True)
    assert y.shape == (2, 6, length) and y.dtype == torch.float32
    assert_rel_close(y, y_ref)
    assert_rel_close(last, last_ref)


def test_optional_arguments_are_optional(scan_path):
    x = make_inputs(1, 3, 2, 20)
    y = selective_scan(x["u"], x["delta"].abs(), x["A"], x["B"], x["C"])
    y_ref = selective_scan_reference(x["u"].double(), x["delta"].abs().double(), x["A"].double(), x["B"].double(),
                                     x["C"].double())
    assert_rel_close(y, y_ref)


def test_very_long_sequence(scan_path):
    """128 frames x 256 tokens in one scan."""
    x = make_inputs(1, 4, 4, 128 * 256)
    y = selective_scan(**x, delta_softplus=True)
    y_ref = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert_rel_close(y, y_ref)


def test_large_delta_times_A_is_stable(scan_path):
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


def test_gradients_match_reference(scan_path):
    x = make_inputs(2, 4, 3, 70)
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    xr = {k: v.double().requires_grad_() for k, v in x.items()}
    w = torch.randn(2, 4, 70)
    (selective_scan(**xs, delta_softplus=True) * w).sum().backward()
    (selective_scan_reference(**xr, delta_softplus=True) * w.double()).sum().backward()
    for k in x:
        assert_rel_close(xs[k].grad, xr[k].grad, rel=1e-4)


# --- the chunked (bounded-memory) PyTorch path on small inputs -------------------------------------------------


@pytest.mark.parametrize("state_bytes, block", [(1, 1), (1, 3), (256, 4), (2048, 16)])
@pytest.mark.parametrize("length", [1, 37, 300])
def test_blocks_and_chunks_of_every_size(monkeypatch, state_bytes, block, length):
    """_plan's choices forced small, so that small inputs take the paths large ones take: many chunks of
    many blocks, a last block shorter than the others, K up to l, padding; values and every gradient."""
    scan = _scan_module()
    monkeypatch.setattr(scan, "CPU_KERNEL", False)
    monkeypatch.setattr(scan, "_STATE_BYTES", state_bytes)
    monkeypatch.setattr(scan, "_BLOCK", block)
    x = make_inputs(2, 6, 4, length, delta_scale=2.0)
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    xr = {k: v.double().requires_grad_() for k, v in x.items()}
    w = torch.randn(2, 6, length)
    y, last = selective_scan(**xs, delta_softplus=True, return_last_state=True)
    (y * w).sum().backward()
    y_ref, last_ref = selective_scan_reference(**xr, delta_softplus=True, return_last_state=True)
    (y_ref * w.double()).sum().backward()
    assert_rel_close(y, y_ref)
    assert_rel_close(last, last_ref)
    for k in x:
        assert_rel_close(xs[k].grad, xr[k].grad, rel=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "time-major"])
@pytest.mark.parametrize("parts", [(), ("delta_bias",), ("D", "z"), ("D", "z", "delta_bias")])
def test_optional_parts_and_layouts(scan_path, monkeypatch, layout, parts):
    """Without softplus, bias, D or z, and with u, delta, z laid out (b, l, d) as the projector passes
    delta and z: the same values and gradients (the chunked path forced through many small chunks)."""
    monkeypatch.setattr(_scan_module(), "_STATE_BYTES", 1)
    monkeypatch.setattr(_scan_module(), "_BLOCK", 3)
    x = make_inputs(2, 5, 3, 41)
    x["delta"] = x["delta"].abs()
    for k in parts:
        del x[k]
    if layout == "time-major":
        x = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v
             for k, v in x.items()}
    xs = {k: v.clone().requires_grad_() for k, v in x.items()}
    xr = {k: v.double().requires_grad_() for k, v in x.items()}
    w = torch.randn(2, 5, 41)
    (selective_scan(**xs) * w).sum().backward()
    (selective_scan_reference(**xr) * w.double()).sum().backward()
    for k in x:
        assert_rel_close(xs[k].grad, xr[k].grad, rel=1e-4)


def test_gradcheck_over_many_blocks(monkeypatch):
    monkeypatch.setattr(_scan_module(), "CPU_KERNEL", False)
    monkeypatch.setattr(_scan_module(), "_BLOCK", 3)
    x = make_inputs(1, 2, 3, 23, dtype=torch.float64)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    inputs = tuple(x[k].requires_grad_() for k in names)

    def f(*args):
        return selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True, chunk_size=8)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


PEAK_GROWTH = """
import importlib, sys, torch
torch.set_num_threads(1)
from storm_lightning.ops import selective_scan
importlib.import_module("storm_lightning.ops.selective_scan").CPU_KERNEL = sys.argv[5] == "numba"

def status(key):  # bytes
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

def inputs(b, d, l, n):
    g = torch.Generator().manual_seed(0)
    x = dict(u=torch.randn(b, d, l, generator=g), delta=torch.randn(b, d, l, generator=g) - 4,
             A=-torch.rand(d, n, generator=g), B=torch.randn(b, n, l, generator=g),
             C=torch.randn(b, n, l, generator=g), D=torch.randn(d, generator=g), z=torch.randn(b, d, l, generator=g),
             delta_bias=torch.randn(d, generator=g))
    return {k: v.requires_grad_() for k, v in x.items()}, torch.randn(b, d, l, generator=g)

x, dy = inputs(1, 8, 64, 4)
selective_scan(**x, delta_softplus=True).backward(dy)  # everything loaded and initialised first
x, dy = inputs(*map(int, sys.argv[1:5]))
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
selective_scan(**x, delta_softplus=True).backward(dy)
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux")
@pytest.mark.parametrize("path", ["numba", "chunked"])
def test_memory_stays_below_one_full_size_tensor(path):
    """Forward+backward at (b, d, l, n) = (1, 256, 8192, 32), in a fresh interpreter (a fork would reuse
    its parent's freed heap): the resident set peaks less than one (b, d, l, n) tensor (256 MiB)
    above its size once the inputs exist (about 120 MiB, of which y and the gradients of u, delta and z
    take 32, and the time-major working copies of these contiguous inputs most of the rest). The version
    that built whole (b, d, l, n) tensors grew by about 3.9 of them."""
    b, d, l, n = 1, 256, 8192, 32
    proc = subprocess.run([sys.executable, "-c", PEAK_GROWTH, str(b), str(d), str(l), str(n), path], capture_output=True,
                          text=True, check=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    growth = int(proc.stdout.strip().splitlines()[-1])
    full = b * d * l * n * 4
    print(f"peak growth {growth / 2**20:.0f} MiB, one full-size tensor {full / 2**20:.0f} MiB")
    assert growth < full
