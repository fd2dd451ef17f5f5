"""The selective scan's recurrence on a CPU as two fused loops compiled by numba (a wheel with its own
LLVM: nothing is compiled at install time; the loops are compiled at their first call, about 4 s, and
cached beside this file or in numba's user cache).

``selective_scan`` uses it for float32 CPU tensors of at most ``selective_scan.CPU_KERNEL_MAX`` (b, d, l)
values. It computes only the core of the scan; softplus, delta_bias, D and the z gate stay PyTorch
operations around it::

    u, delta: (b, d, l)   A: (d, n)   B, C: (b, n, l)       (delta already softplus'd and biased)
    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t        h: (b, d, n), h_0 = 0
    y_t = <C_t, h_t>                                      y: (b, d, l); also h_l: (b, d, n)

Why: the chunked PyTorch scan (``selective_scan._ChunkedScan``) makes about 30 passes over (b, d, l, n)-sized
data per forward+backward, each a separate small operation; here each channel's recurrence runs in one
loop with its state in registers. At the tiny default's clip batch the core is 3.7x faster than the
chunked scan (18 against 66 ms, freed memory returned); with storm-fit's kept freed memory and the
PyTorch operations around it, a training step of the default was 8-22 % faster (docs/performance.md).
For large scans the chunked scan is as fast and leaner, and is used instead.

Forward: one parallel loop over the b*d channels. Backward: the channels are split into as many groups
as numba has threads, each group in one thread: per channel it runs the recurrence forward again,
keeping that channel's l states and decays (2 (l, n) buffers per thread: O(l n), so memory stays
O(b d l) overall), then the adjoint ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` backward, reading
every gradient off (g_t, h_{t-1}). dB and dC sum over channels, so each group adds into its own
(b, l, n) buffer and the groups' buffers are summed; dA's rows belong to one group each.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor


@njit(parallel=True, cache=True)
def _forward(u, dt, A, B, C, y, last):  # pragma: no cover (compiled)
    """u, dt, y: (b, d, l); A: (d, n); B, C: (b, l, n) (time-major); last: (b, d, n)."""
    b, d, l = u.shape
    n = A.shape[1]
    for channel in prange(b * d):
        bi = channel // d
        di = channel - bi * d
        h = np.zeros(n, np.float32)
        for t in range(l):
            s = dt[bi, di, t]
            x = s * u[bi, di, t]
            acc = np.float32(0.0)
            for k in range(n):
                hk = np.exp(s * A[di, k]) * h[k] + x * B[bi, t, k]
                h[k] = hk
                acc += C[bi, t, k] * hk
            y[bi, di, t] = acc
        for k in range(n):
            last[bi, di, k] = h[k]


@njit(parallel=True, cache=True)
def _backward(u, dt, A, B, C, dy, du, ddt, dA, dB_parts, dC_parts):  # pragma: no cover (compiled)
    """Gradients of sum(y * dy): du, ddt: (b, d, l); dA: (d, n), zeroed; dB_parts, dC_parts:
    (groups, b, l, n), zeroed, one per thread, summed by the caller."""
    b, d, l = u.shape
    n = A.shape[1]
    groups = dB_parts.shape[0]
    for group in prange(groups):
        states = np.empty((l + 1, n), np.float32)  # h_0 .. h_l of one channel
        decays = np.empty((l, n), np.float32)
        g = np.empty(n, np.float32)
        for bi in range(b):
            for di in range(group * d // groups, (group + 1) * d // groups):
                for k in range(n):
                    states[0, k] = 0.0
                for t in range(l):
                    s = dt[bi, di, t]
                    x = s * u[bi, di, t]
                    for k in range(n):
                        e = np.exp(s * A[di, k])
                        decays[t, k] = e
                        states[t + 1, k] = e * states[t, k] + x * B[bi, t, k]
                for k in range(n):
                    g[k] = 0.0
                for t in range(l - 1, -1, -1):
                    s = dt[bi, di, t]
                    ut = u[bi, di, t]
                    gy = dy[bi, di, t]
                    du_t = np.float32(0.0)
                    ddt_t = np.float32(0.0)
                    for k in range(n):
                        gk = g[k] + C[bi, t, k] * gy  # dL/dh_t
                        dC_parts[group, bi, t, k] += gy * states[t + 1, k]
                        dB_parts[group, bi, t, k] += gk * s * ut
                        du_t += gk * B[bi, t, k]
                        e = decays[t, k]
                        q = gk * e * states[t, k]  # dL/d(delta_t A) through the decay
                        ddt_t += q * A[di, k] + gk * B[bi, t, k] * ut
                        dA[di, k] += q * s
                        g[k] = gk * e  # the part passed on to h_{t-1}
                    du[bi, di, t] = du_t * s
                    ddt[bi, di, t] = ddt_t


def _threads() -> int:
    """numba's threads, as many as torch uses (both default to the cores; a user's setting wins)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _array(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class CoreScan(torch.autograd.Function):
    """(u, delta, A, B, C) -> (y, h_l), float32 CPU tensors, shapes as in the module docstring; h_l has
    no gradient (as in mamba-ssm)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        b, d, l = u.shape
        u, delta, A = u.detach().contiguous(), delta.detach().contiguous(), A.detach().contiguous()
        B_rows, C_rows = B.detach().transpose(1, 2).contiguous(), C.detach().transpose(1, 2).contiguous()
        y, last = u.new_empty(b, d, l), u.new_empty(b, d, A.shape[1])
        _threads()
        _forward(u.numpy(), delta.numpy(), A.numpy(), B_rows.numpy(), C_rows.numpy(), y.numpy(), last.numpy())
        ctx.save_for_backward(u, delta, A, B_rows, C_rows)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, dy: Tensor, _dlast: Tensor):
        u, delta, A, B_rows, C_rows = ctx.saved_tensors
        b, d, l = u.shape
        groups = min(_threads(), d)
        du, ddelta, dA = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(A)
        dB_parts = u.new_zeros(groups, b, l, A.shape[1])
        dC_parts = u.new_zeros(groups, b, l, A.shape[1])
        _backward(u.numpy(), delta.numpy(), A.numpy(), B_rows.numpy(), C_rows.numpy(), _array(dy.float()),
                  du.numpy(), ddelta.numpy(), dA.numpy(), dB_parts.numpy(), dC_parts.numpy())
        return du, ddelta, dA, dB_parts.sum(0).transpose(1, 2), dC_parts.sum(0).transpose(1, 2)
