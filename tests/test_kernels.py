"""mamba-ssm kernels count as available only when their compiled extensions are really there."""

import sys
import types

import pytest
import torch

from storm_lightning.ops import kernels


def install(monkeypatch, modules: dict) -> None:
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
        monkeypatch.setitem(sys.modules, name, module)


def fn(*args, **kwargs):
    return None


WRAPPERS = {"mamba_ssm": {}, "mamba_ssm.ops": {}, "mamba_ssm.ops.selective_scan_interface": {"selective_scan_fn": fn},
            "causal_conv1d": {"causal_conv1d_fn": fn}}
EXTENSIONS = {"selective_scan_cuda": {"fwd": fn, "bwd": fn},
              "causal_conv1d_cuda": {"causal_conv1d_fwd": fn, "causal_conv1d_bwd": fn}}


@pytest.fixture
def on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernels.mamba_ssm_kernels.cache_clear()
    yield
    kernels.mamba_ssm_kernels.cache_clear()


def test_packages_and_extensions_present(on_a_gpu, monkeypatch):
    install(monkeypatch, {**WRAPPERS, **EXTENSIONS})
    found = kernels.mamba_ssm_kernels()
    assert found is not None and found.selective_scan_fn is fn and found.causal_conv1d_fn is fn


@pytest.mark.parametrize("broken", ["no selective_scan_cuda", "selective_scan_cuda without bwd",
                                    "no causal_conv1d_cuda"])
def test_python_packages_without_their_extensions_fall_back(on_a_gpu, monkeypatch, broken):
    """mamba-ssm's main branch imports fine without building selective_scan_cuda; its first call raises."""
    extensions = dict(EXTENSIONS)
    if broken == "no selective_scan_cuda":
        del extensions["selective_scan_cuda"]
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)  # import raises ImportError
    elif broken == "selective_scan_cuda without bwd":
        extensions["selective_scan_cuda"] = {"fwd": fn}
    else:
        del extensions["causal_conv1d_cuda"]
        monkeypatch.setitem(sys.modules, "causal_conv1d_cuda", None)
    install(monkeypatch, {**WRAPPERS, **extensions})
    assert kernels.mamba_ssm_kernels() is None


def test_no_cuda_no_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kernels.mamba_ssm_kernels.cache_clear()
    install(monkeypatch, {**WRAPPERS, **EXTENSIONS})
    assert kernels.mamba_ssm_kernels() is None
    kernels.mamba_ssm_kernels.cache_clear()
