"""Selective scan (the S6 recurrence of Mamba) in pure PyTorch, chunked so it is fast on a CPU.

Semantics and shapes are those of mamba-ssm's ``selective_scan_fn``::

    u, delta: (b, d, l)   A: (d, n)   B, C: (b, n, l)   D: (d,)   z: (b, d, l)   delta_bias: (d,)

    delta_t = softplus(delta_t + delta_bias)            (each part optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       h: (b, d, n)
    y_t     = <C_t, h_t> + D * u_t ;   y_t *= silu(z_t)              y: (b, d, l)

How it is computed. The sequence is cut into ``nc`` chunks of ``K`` steps (K ~ sqrt(l/2)).

1. Every chunk is run from a zero state, one step at a time but all chunks at once (K Python
   iterations on (b, nc, d, n) tensors), to get the state each chunk ends in.
2. The state entering each chunk is carried across chunks (nc iterations on (b, d, n) tensors), using
   each chunk's total decay ``exp(A * sum(delta))``.
3. Every chunk is run again from its true initial state, all chunks at once, reading ``y_t``.

Backward (a hand-written ``autograd.Function``) runs the adjoint recurrence the same way in reverse.
Between forward and backward only the inputs and the state entering each chunk are kept, nothing of
size (b, d, l, n).

So there are about ``3 * sqrt(l/2)`` Python iterations instead of ``l``, and every exponent is of a
non-positive number whenever ``delta >= 0`` and ``A <= 0`` (Mamba's case: softplus delta, A = -exp(A_log)):
a large ``delta * A`` underflows to an exact zero decay instead of overflowing, unlike the
``exp(S_t) * cumsum(exp(-S_t) * x)`` factorisation, and no partial product is ever divided out.
Computation is in float32 (float64 if given); the result has the input dtype.
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


def _steps(t: Tensor, K: int) -> Tensor:
    """(b, x, nc * K) -> (K, b, nc, x): step j of every chunk is one contiguous slice."""
    return t.unflatten(-1, (-1, K)).permute(3, 0, 2, 1).contiguous()


def _unsteps(t: Tensor) -> Tensor:
    """(K, b, nc, x) -> (b, x, nc * K)"""
    K, b, nc, x = t.shape
    return t.permute(1, 3, 2, 0).reshape(b, x, nc * K)


class _ChunkedScan(torch.autograd.Function):
    """The recurrence on padded inputs ``u, delta: (b, d, L)``, ``B, C: (b, n, L)``, ``L = nc * K``.

    Layout inside: (K, b, nc, d, n), "full size". Forward keeps nothing full-size; it saves the inputs
    and the state entering each chunk, and backward recomputes the rest. Backward runs the adjoint
    recurrence ``g_t = C_t dy_t + dA_{t+1} g_{t+1}`` (g = dL/dh_t) in reverse with the same two passes
    and chunk carry as forward, then reads every gradient off ``g`` and the states ``h``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, K: int):
        delta_k, u_k, B_k, C_k = _steps(delta, K), _steps(u, K), _steps(B, K), _steps(C, K)
        dA = torch.exp(delta_k.unsqueeze(-1) * A)  # (K, b, nc, d, n); <= 1 in Mamba
        X = (delta_k * u_k).unsqueeze(-1) * B_k.unsqueeze(-2)
        # 1. the state each chunk ends in from a zero start, all chunks at once
        h = torch.zeros_like(X[0])
        for j in range(K):
            h.mul_(dA[j]).add_(X[j])
        # 2. carry across chunks with each chunk's total decay exp(A * sum(delta))
        chunk_decay = torch.exp(delta_k.sum(0).unsqueeze(-1) * A)  # (b, nc, d, n)
        H = torch.zeros_like(h)  # H[:, c]: the state entering chunk c
        for c in range(1, H.shape[1]):
            torch.addcmul(h[:, c - 1], chunk_decay[:, c - 1], H[:, c - 1], out=H[:, c])
        # 3. every chunk again from its true initial state, reading y_t = <C_t, h_t>
        h = H.clone()
        y = torch.empty_like(delta_k)
        for j in range(K):
            h.mul_(dA[j]).add_(X[j])
            y[j] = (h @ C_k[j].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(u, delta, A, B, C, H)
        ctx.K = K
        last = h[:, -1].clone()
        ctx.mark_non_differentiable(last)
        return _unsteps(y), last

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, H = ctx.saved_tensors
        K = ctx.K
        delta_k, u_k, B_k, C_k, dy_k = (_steps(t, K) for t in (delta, u, B, C, dy.contiguous()))
        dA = torch.exp(delta_k.unsqueeze(-1) * A)
        du_k = delta_k * u_k
        # states after every step
        hs = du_k.unsqueeze(-1) * B_k.unsqueeze(-2)  # X, overwritten in place by h_t
        hs[0].addcmul_(dA[0], H)
        for j in range(1, K):
            hs[j].addcmul_(dA[j], hs[j - 1])
        # adjoint, pass 1: dL/dh at each chunk's start from a zero end, times that step's decay
        Cdy = lambda j: C_k[j].unsqueeze(-2) * dy_k[j].unsqueeze(-1)  # noqa: E731  (b, nc, d, n)
        carry = torch.zeros_like(H)
        for j in reversed(range(K)):
            carry = (carry + Cdy(j)).mul_(dA[j])
        # carry backwards across chunks: R[:, c] arrives at the end of chunk c from chunk c + 1
        chunk_decay = torch.exp(delta_k.sum(0).unsqueeze(-1) * A)
        R = torch.zeros_like(H)
        for c in range(H.shape[1] - 2, -1, -1):
            torch.addcmul(carry[:, c + 1], chunk_decay[:, c + 1], R[:, c + 1], out=R[:, c])
        # adjoint, pass 2: g_t for every step
        gs = torch.empty_like(hs)
        carry = R
        for j in reversed(range(K)):
            torch.add(carry, Cdy(j), out=gs[j])
            carry = dA[j] * gs[j]
        # gradients. X_t = delta_t u_t B_t ; dA_t = exp(delta_t A) ; y_t = <C_t, h_t>
        gB = (gs @ B_k.unsqueeze(-1)).squeeze(-1)  # sum_n g B: (K, b, nc, d)
        dB = (gs.transpose(-1, -2) @ du_k.unsqueeze(-1)).squeeze(-1)  # sum_d g delta u: (K, b, nc, n)
        dC = (hs.transpose(-1, -2) @ dy_k.unsqueeze(-1)).squeeze(-1)  # sum_d h dy
        Q = gs.mul_(dA)  # dL/d(delta A) = g_t * dA_t * h_{t-1}, built in g's memory
        Q[0].mul_(H)
        Q[1:].mul_(hs[:-1])
        del hs, dA
        ddelta = (Q * A).sum(-1) + gB * u_k
        dA_param = (Q * delta_k.unsqueeze(-1)).sum((0, 1, 2))
        du = gB * delta_k
        return _unsteps(du), _unsteps(ddelta), dA_param, _unsteps(dB), _unsteps(dC), None


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
    """Selective scan with mamba-ssm's signature; returns ``y: (b, d, l)`` (and ``h_l: (b, d, n)``).

    The last state is returned without gradient, as in mamba-ssm.
    """
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
    pad = -l % K
    if pad:  # delta = 0 on padding: decay exp(0) = 1 and input 0, so the state passes through unchanged
        u_p, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))
    else:
        u_p = u
    y, last = _ChunkedScan.apply(u_p, delta, A, B, C, K)
    y = y[..., :l]
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, last.to(out_dtype)) if return_last_state else y


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
