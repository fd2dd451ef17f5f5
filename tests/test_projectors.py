"""Projectors: shapes, equality with transformers' MambaMixer, bidirectionality, backends."""

import pytest
import torch

from storm_lightning.errors import ConfigError
from storm_lightning.projectors import BiMambaMixer, MambaTemporalProjector, MLPProjector
from tests.conftest import requires_cuda


@pytest.mark.parametrize("projector", [
    MambaTemporalProjector(input_dim=16, output_dim=24, num_layers=2, d_state=4),
    MambaTemporalProjector(input_dim=16, output_dim=16, num_layers=1, d_state=4, bidirectional=False),
    MLPProjector(input_dim=16, output_dim=24, hidden_dim=32),
])
def test_projector_shapes(projector):
    x = torch.randn(3, 5, 4, projector.input_dim)
    assert projector(x).shape == (3, 5, 4, projector.output_dim)
    with pytest.raises(AssertionError, match="expects"):
        projector(torch.randn(3, 5, projector.input_dim + 1))


def test_forward_direction_equals_transformers_mamba_mixer():
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = MambaConfig(hidden_size=16, state_size=4, expand=2, conv_kernel=4, time_step_rank=3,
                         use_bias=False, use_conv_bias=True)
    reference = MambaMixer(config, layer_idx=0).eval()
    ours = BiMambaMixer(16, d_state=4, d_conv=4, expand=2, dt_rank=3, bidirectional=False, backend="torch")
    # same names and layouts: the reference's weights load as they are
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not missing, missing
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


def slow_decay(module):
    """At mamba-ssm's initialisation a token 30 steps away has an influence of ~1e-5, below fp32 rounding
    of the residual; with dt ~ 0.3 and A = -0.01 the state keeps ~90% over 30 steps, so it shows."""
    for name, p in module.named_parameters():
        if name.endswith(("A_log", "A_b_log")):
            p.data.fill_(-4.6)  # A = -exp(-4.6) = -0.01
    return module.double()


def test_bidirectional_mixer_sees_the_future():
    mixer = slow_decay(BiMambaMixer(8, d_state=4, bidirectional=True, dt_min=0.1, dt_max=0.5))
    x = torch.randn(1, 30, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert (mixer(x)[:, 0] - mixer(x2)[:, 0]).abs().max() > 1e-7  # float64 rounding is ~1e-16


def test_unidirectional_mixer_is_causal():
    mixer = slow_decay(BiMambaMixer(8, d_state=4, bidirectional=False, dt_min=0.1, dt_max=0.5))
    x = torch.randn(1, 30, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(mixer(x)[:, :-1], mixer(x2)[:, :-1])


def test_projector_scans_across_frames():
    """The last frame's last token reaches the first frame's first token (frame-to-frame scan)."""
    proj = slow_decay(MambaTemporalProjector(8, 8, num_layers=1, d_state=4))
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[0, -1, -1] += torch.randn(8, dtype=torch.float64)  # not a constant: LayerNorm removes those
    with torch.no_grad():
        assert (proj(x)[0, 0, 0] - proj(x2)[0, 0, 0]).abs().max() > 1e-7


def test_bidirectional_parameter_names():
    names = set(dict(BiMambaMixer(8, d_state=4).named_parameters()))
    forward = {"in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
               "dt_proj.bias", "A_log", "D", "out_proj.weight"}
    backward = {"conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias",
                "A_b_log", "D_b"}
    assert names == forward | backward


def test_mamba_ssm_backend_without_kernels_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the kernels may be installed")
    with pytest.raises(ConfigError, match="backend=mamba_ssm needs CUDA"):
        MambaTemporalProjector(8, 8, backend="mamba_ssm")
    with pytest.raises(ValueError, match="auto|torch|mamba_ssm"):
        MambaTemporalProjector(8, 8, backend="triton")


@requires_cuda
def test_mamba_ssm_backend_matches_torch_backend():
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    fast = MambaTemporalProjector(64, 64, num_layers=2, backend="mamba_ssm").cuda()
    slow = MambaTemporalProjector(64, 64, num_layers=2, backend="torch").cuda()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, 16, 64, device="cuda")
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-3, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    from storm_lightning.vision import SiglipVisionBackbone

    for make in (lambda ckpt: MambaTemporalProjector(8, 8, num_layers=2, d_state=4, gradient_checkpointing=ckpt),
                 lambda ckpt: SiglipVisionBackbone(image_size=16, patch_size=8, hidden_size=16, num_layers=2,
                                                   num_heads=2, intermediate_size=32, gradient_checkpointing=ckpt)):
        torch.manual_seed(0)
        plain = make(False)
        torch.manual_seed(0)
        checkpointed = make(True)
        x = torch.randn(2, 3, 16, 16) if isinstance(plain, SiglipVisionBackbone) else torch.randn(1, 3, 4, 8)
        for m in (plain, checkpointed):
            m.train()
            m(x).square().sum().backward()
        for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bidirectional_mixer_gradients_match_the_recurrence(monkeypatch):
    """Every parameter's gradient, both scan directions (flip, per-direction conv/x_proj/dt_proj/A/D,
    shared in/out_proj), against autograd through the plain recurrence: the hand-written backward
    is only tested on the scan alone elsewhere."""
    import storm_lightning.projectors as projectors
    from storm_lightning.ops import selective_scan_reference

    torch.manual_seed(0)
    mixer = slow_decay(BiMambaMixer(8, d_state=4, bidirectional=True, dt_min=0.1, dt_max=0.5, backend="torch"))
    x = torch.randn(2, 37, 8, dtype=torch.float64)  # not a multiple of the scan's chunk size
    readout = torch.randn(8, dtype=torch.float64)

    def gradients():
        mixer.zero_grad()
        (mixer(x) @ readout).square().sum().backward()
        return {name: p.grad.clone() for name, p in mixer.named_parameters()}

    ours = gradients()
    calls = []
    monkeypatch.setattr(projectors, "selective_scan", lambda *a, **k: calls.append(1) or selective_scan_reference(*a, **k))
    reference = gradients()
    assert len(calls) == 2  # one per direction: the reference really ran
    assert set(ours) == set(reference) and len(ours) == 16
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ours[name], grad, rtol=1e-7, atol=1e-10, msg=name)
