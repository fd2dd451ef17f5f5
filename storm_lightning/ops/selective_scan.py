"""Selective scan (the S6 recurrence of Mamba) in pure PyTorch, chunked so it is fast on a CPU.

Semantics and shapes are those of mamba-ssm's ``selective_scan_fn``::

    u, delta: (b, d, l)   A: (d, n)   B, C: (b, n, l)   D: (d,)   z: (b, d, l)   delta_bias: (d,)

    delta_t = softplus(delta_t + delta_bias)            (each part optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       h: (b, d, n)
    y_t     = <C_t, h_t> + D * u_t ;   y_t *= silu(z_t)              y: (b, d, l)

How it is computed. The sequence is cut into ``nc`` chunks of ``K`` steps (K ~ sqrt(l/2)).

1. Inside every chunk the recurrence is run from a zero state, one step at a time but for all chunks at
   once: K Python iterations, each on a (b, d, nc, n) tensor.
2. The state entering each chunk is carried across chunks: nc iterations on (b, d, n) tensors.
3. Each output gets the carried state's contribution, ``<C_t, exp(S_t) * H_chunk>``, where
   ``S_t = sum(delta * A)`` over the chunk up to t.

So there are about ``3 * sqrt(l/2)`` Python iterations instead of ``l``, and every exponent is of a
non-positive number whenever ``delta >= 0`` and ``A <= 0`` (Mamba's case: softplus delta, A = -exp(A_log)):
large ``delta * A`` underflows to an exact zero decay instead of overflowing, unlike the
``exp(S_t) * cumsum(exp(-S_t) * x)`` factorisation. Gradients come from autograd through these few
large ops. Computation is in float32 (float64 if given), the result in the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def default_chunk_size(length: int) -> int:
    """K ~ sqrt(length / 2) as a power of two in [4, 128]: the inner loop's steps cost about twice the
    carry loop's, so this balances the two (measured best at l=2048, see docs/performance.md)."""
    return int(min(128, max(4, 2 ** round(math.log2(max(1.0, math.sqrt(length / 2)))))))


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's signature; returns ``y: (b, d, l)`` (and ``h_l: (b, d, n)``)."""
    b, d, l = u.shape
    n = A.shape[1]
    assert delta.shape == (b, d, l), f"delta {tuple(delta.shape)} != u {(b, d, l)}"
    assert A.shape == (d, n), f"A {tuple(A.shape)} != (d={d}, n)"
    assert B.shape == (b, n, l) and C.shape == (b, n, l), f"B/C {tuple(B.shape)}/{tuple(C.shape)} != {(b, n, l)}"

    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    K = chunk_size or default_chunk_size(l)
    nc = -(-l // K)
    pad = nc * K - l
    if pad:  # delta = 0 on padding: decay exp(0) = 1 and input 0, so the state passes through unchanged
        u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))

    # Step-major layout (K, b, nc, d, n): step j of every chunk is one slice, and the contraction over
    # n in <C_t, h_t> is a batched matmul (h @ C) that needs no full-size temporary.
    delta_k = delta.unflatten(-1, (nc, K)).permute(3, 0, 2, 1)  # (K, b, nc, d)
    u_k = u.unflatten(-1, (nc, K)).permute(3, 0, 2, 1)
    B_k = B.unflatten(-1, (nc, K)).permute(3, 0, 2, 1).unsqueeze(-2)  # (K, b, nc, 1, n)
    C_k = C.unflatten(-1, (nc, K)).permute(3, 0, 2, 1).unsqueeze(-1)  # (K, b, nc, n, 1)
    dA_log = delta_k.unsqueeze(-1) * A  # (K, b, nc, d, n), <= 0 in Mamba
    decay = torch.exp(dA_log)
    inputs = (delta_k * u_k).unsqueeze(-1) * B_k

    # 1. the state each chunk ends in when started from zero. unbind, not decay[j]: autograd turns one
    # unbind into one stack, but K index ops into K full-size zero tensors.
    decay_steps, input_steps = decay.unbind(0), inputs.unbind(0)
    h = torch.zeros_like(inputs[0])  # (b, nc, d, n)
    for decay_j, input_j in zip(decay_steps, input_steps):
        h = torch.addcmul(input_j, decay_j, h)

    # 2. carry the state across chunks: H[:, c] enters chunk c. A chunk's total decay is
    # exp(A * sum(delta over the chunk)), exact and cheap.
    chunk_decay = torch.exp(delta_k.sum(0).unsqueeze(-1) * A)  # (b, nc, d, n)
    carried = [torch.zeros_like(h[:, 0])]
    for decay_c, h_c in zip(chunk_decay.unbind(1)[:-1], h.unbind(1)[:-1]):
        carried.append(torch.addcmul(h_c, decay_c, carried[-1]))
    H = torch.stack(carried, dim=1)  # (b, nc, d, n)

    # 3. run every chunk again from its true initial state, reading the outputs
    h, y = H, []
    for decay_j, input_j, C_j in zip(decay_steps, input_steps, C_k.unbind(0)):
        h = torch.addcmul(input_j, decay_j, h)
        y.append(h @ C_j)
    y = torch.stack(y).squeeze(-1)  # (K, b, nc, d)
    y = y.permute(1, 3, 2, 0).reshape(b, d, nc * K)[..., :l]

    if D is not None:
        y = y + u[..., :l] * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    if return_last_state:
        last = h[:, -1]
        return y, last.to(out_dtype)
    return y


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence, one time step per iteration: the definition the fast paths are tested against."""
    dtype = u.dtype
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return (y.to(dtype), h.to(dtype)) if return_last_state else y.to(dtype)
