"""Selective scan (the S6 recurrence of Mamba): ``selective_scan``, and its chunked pure-PyTorch form.

On a CPU, small float32 scans run their recurrence in numba's loops (``cpu_scan.py``; ``CPU_KERNEL``,
``CPU_KERNEL_MAX``). The chunked PyTorch scan below serves everything else: large scans, GPUs without
mamba-ssm, float64, an explicit ``chunk_size``, a CPU without numba.

Semantics and shapes are those of mamba-ssm's ``selective_scan_fn``::

    u, delta: (b, d, l)   A: (d, n)   B, C: (b, n, l)   D: (d,)   z: (b, d, l)   delta_bias: (d,)

    delta_t = softplus(delta_t + delta_bias)            (each part optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       h: (b, d, n)
    y_t     = <C_t, h_t> + D * u_t ;   y_t *= silu(z_t)              y: (b, d, l)

How it is computed. The sequence is cut into ``nc`` chunks of ``K`` steps, and the chunks are run side
by side: one Python iteration advances every chunk by one step, on a (b, nc, n, d) tensor, "a state".

1. Every chunk is run from a zero state to get the state each chunk ends in.
2. The state entering each chunk is carried across chunks (nc iterations on (b, n, d) tensors), using
   each chunk's total decay ``exp(A * sum(delta))``.
3. Every chunk is run again from its true initial state, reading ``y_t``.

Backward (a hand-written ``autograd.Function``) runs the adjoint recurrence ``g_t = C_t dy_t +
exp(delta_{t+1} A) g_{t+1}`` (g = dL/dh_t) the same way in reverse, and reads every gradient off the
pairs (g_t, h_{t-1}) of each step. The softplus, D and z parts are done inside too, step by step, so
that none of their (b, d, l) intermediates is kept between forward and backward.

Memory. Nothing of the size of all steps' states, (b, d, l, n) ("full size"), is ever allocated. The K
steps of a chunk are processed in blocks of S; a step's decay ``exp(delta_t A)`` and input ``delta_t
u_t B_t`` are computed from the (b, d, l) and (b, n, l) inputs only when its block is processed, into
buffers of S states that every block reuses. Between forward and backward only the inputs and the
state entering each chunk (one state: full size / K) are kept. Backward needs h_{t-1} next to g_t; the
two run in opposite directions and must not be recovered from each other by division (see below), so
backward first runs the recurrence forward once more and keeps the state entering every block (K / S
states), then takes the blocks last to first: it recomputes the block's states from the one entering
it (S states) and runs its adjoints backward (S states). In all, at most

    (3 S + 6) states + K / S states = (3 S + 6) * 256 KiB + full size / S

(``_plan`` keeps a state under 256 KiB where l allows, and S = 16: the second term is then one (b, d,
l) tensor at n = 16). On top of that: y, the gradients (the floor: a function returning them cannot
use less), and at most three (b, d, l) working tensors, the softplus'd delta, u made time-major (below)
and du before it is transposed back. At (1, 1024, 16384, 16) forward+backward grows the process by
0.58 GiB against a floor of 0.25 (the version with full-size intermediates: 3.9 GiB).

Speed. The scan is memory-bound, and small states are also what makes it fast: each step's operations
work on at most 256 KiB and a block's buffers on 4 MiB, which stay in the CPU's caches from one step
to the next, for about 7 K operations per forward+backward (K is in the thousands at paper shapes;
a few microseconds each of Python overhead).

Layout. Inside, every (b, x, l) tensor is time-major, (b, L, x) read as (b, nc, K, x), zero-padded to
L = nc K steps (delta = 0 on padding: decay 1 and input 0, so the state passes through unchanged);
states and buffers have d last. So every elementwise operation runs along d (the long axis; n is 16),
contiguous, and a block of steps is a view, not a copy. The projector's delta and z already come
time-major (they are transposes of linear outputs) and are used in place; u is transposed once per
pass with a tiled 2-D transpose per batch element (``_time_major``).

Robustness. Every exponent is of a non-positive number whenever ``delta >= 0`` and ``A <= 0`` (Mamba's
case: softplus delta, A = -exp(A_log)): a large ``delta * A`` underflows to an exact zero decay
instead of overflowing, unlike the ``exp(S_t) * cumsum(exp(-S_t) * x)`` factorisation, and no
partial product is ever divided out (which is why backward recomputes states instead of running
``h_{t-1} = (h_t - x_t) / exp(delta_t A)`` backward). Computation is in float32 (float64 if given);
the result has the input dtype.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)
# A state, (b, nc, n, d), is kept at most this large by choosing K (see _plan).
_STATE_BYTES = 256 * 2**10
# Steps per block (see _plan).
_BLOCK = 16
# On a CPU, float32 scans of at most CPU_KERNEL_MAX (b, d, l) values run the recurrence in numba's loops
# (cpu_scan.py); this module's chunked PyTorch scan serves larger ones (where it was as fast and needed
# less memory: docs/performance.md), GPUs without mamba-ssm, float64, an explicit chunk_size, and a CPU
# without numba. Tests set CPU_KERNEL to False to test the chunked scan on small inputs.
CPU_KERNEL = True
CPU_KERNEL_MAX = 1 << 22


@functools.cache
def _cpu_kernel():
    """cpu_scan.CoreScan, or None when numba cannot be imported (logged once)."""
    try:
        from storm_lightning.ops.cpu_scan import CoreScan
    except ImportError as exn:
        log.info("numba not usable (%s): the chunked PyTorch scan runs on the CPU", exn)
        return None
    return CoreScan


def default_chunk_size(length: int) -> int:
    """K ~ sqrt(length / 2) as a power of two in [4, 128]: the inner loops cost about K Python
    iterations per pass and the carry loop nc = l / K, so this balances the two when the tensors are
    small enough for the Python overhead to matter (measured best at l=2048, see docs/performance.md)."""
    return int(min(128, max(4, 2 ** round(math.log2(max(1.0, math.sqrt(length / 2)))))))


def _plan(b: int, d: int, length: int, n: int, itemsize: int, chunk_size: int | None) -> tuple[int, int]:
    """Chunk size K and block size S.

    K: ``chunk_size`` if given, else ``default_chunk_size(l)``, doubled while a state (b, nc, n, d) is
    larger than ``_STATE_BYTES``, up to l. Each step's operations then work on at most 256 KiB, a
    block's buffers on S times that (4 MiB), and they stay in the CPU's caches from one step to the
    next: the scan is memory-bound, and at the tiny default (8 clips, (8, 256, 512, 16), 2 threads,
    freed host memory kept as storm-fit keeps it) forward+backward takes 124 ms against 149 ms for the
    version with whole-chunk full-size buffers, at the price of more, smaller operations (about 7 K per
    forward+backward). It also bounds the states
    alive at once to ``(3 S + 6) * _STATE_BYTES`` plus the K / S block checkpoints, full size / S.

    S = ``_BLOCK`` (or K if smaller): the checkpoints are then one (b, d, l) tensor's worth at n = 16.
    K is finally evened out over the chunks, so that the padding stays under one step per chunk.
    """
    K = chunk_size or default_chunk_size(length)
    if not chunk_size:
        while K < length and b * -(-length // K) * n * d * itemsize > _STATE_BYTES:
            K *= 2
        K = -(-length // -(-length // K))  # ceil(l / nc) for the same nc: nc * K - l < nc
    return K, min(_BLOCK, K)


def _time_major(t: Tensor, nc: int, K: int, fn=None) -> Tensor:
    """``t: (b, x, l)`` -> ``fn(t)`` as ``(b, nc, K, x)``: time-major, and zero on the padding steps
    ``l .. nc K - 1``. Without ``fn``, ``t`` itself (a view) when its steps are already rows.

    A channel-major ``t`` is copied with one 2-D transpose per batch element, which PyTorch does in
    cache-sized tiles: a plain copy of the transposed view walks one side across rows, 6x slower at
    (1024, 16384). ``fn`` (elementwise) is applied in slices of steps, so its temporaries stay small.
    """
    b, x, l = t.shape
    rows = t.transpose(1, 2)
    if fn is None and l == nc * K and rows.stride(-1) == 1:
        return rows.unflatten(1, (nc, K))
    out = t.new_empty(b, nc * K, x)
    out[:, l:].zero_()
    if rows.stride(-1) == 1 or x == 1:
        out[:, :l].copy_(rows)
    else:
        t = t.contiguous()
        for i in range(b):
            out[i, :l].copy_(t[i].t())
    if fn is not None:
        step = max(1, 2**20 // max(1, b * x))
        for t0 in range(0, l, step):
            part = out[:, t0 : min(l, t0 + step)]
            part.copy_(fn(part))
    return out.view(b, nc, K, x)


def _channel_major(t: Tensor, like: Tensor) -> Tensor:
    """The inverse of ``_time_major``: ``t: (b, nc, K, x)`` -> ``(b, x, l)``, ``l = like.shape[-1]``, a
    view if ``like``'s steps are rows, else contiguous (so that the caller's next elementwise operations
    with ``like`` do not mix layouts, which is slow for the same reason)."""
    b, x, l = like.shape
    rows = t.flatten(1, 2)[:, :l]
    if like.transpose(1, 2).stride(-1) == 1:
        return rows.transpose(1, 2)
    out = t.new_empty(b, x, l)
    for i in range(b):
        out[i].copy_(rows[i].t())
    return out


def _block(t: Tensor | None, j0: int, j1: int) -> Tensor | None:
    """Steps j0..j1-1 of every chunk of ``t: (b, nc, K, x)`` as an ``(s, b, nc, x)`` view."""
    return None if t is None else t[:, :, j0:j1].permute(2, 0, 1, 3)


def _decay(delta: Tensor, AT: Tensor, out: Tensor) -> Tensor:
    """A block's decays ``exp(delta A)``: ``delta: (s, b, nc, d)``, ``AT = A.T`` -> ``out: (s, b, nc, n, d)``."""
    return torch.mul(delta.unsqueeze(-2), AT, out=out).exp_()  # <= 1 in Mamba


def _inputs(du: Tensor, B: Tensor, out: Tensor) -> Tensor:
    """A block's inputs ``delta u B``: ``du = delta u: (s, b, nc, d)``, ``B: (s, b, nc, n)`` -> ``out``."""
    return torch.mul(du.unsqueeze(-2), B.unsqueeze(-1), out=out)


def _run_states(h0: Tensor, dA: Tensor, X: Tensor) -> Tensor:
    """The recurrence over a block from state ``h0``: X[i] becomes h after step i, in X's memory."""
    X[0].addcmul_(dA[0], h0)
    for i in range(1, X.shape[0]):
        X[i].addcmul_(dA[i], X[i - 1])
    return X


def _run_adjoints(carry: Tensor, dA: Tensor, G: Tensor) -> Tensor:
    """The adjoint recurrence over a block, backward: given ``G[i] = C_i dy_i`` and ``carry``, the
    dL/dh arriving at the block's end, G[i] becomes g_i and dA[i] becomes ``P_i = dA_i g_i``, the part
    of g passed on to the step before (so ``P_0`` is what the block passes on). Returns P."""
    G[-1].add_(carry)
    dA[-1].mul_(G[-1])
    for i in range(G.shape[0] - 2, -1, -1):
        G[i].add_(dA[i + 1])
        dA[i].mul_(G[i])
    return dA


def _readout(hs: Tensor, C: Tensor, u: Tensor, D: Tensor | None) -> Tensor:
    """``<C_t, h_t> + D u_t`` for a block: ``hs: (s, b, nc, n, d)`` -> ``(s, b, nc, d)``."""
    y = (C.unsqueeze(-2) @ hs).squeeze(-2)
    return y if D is None else y.addcmul_(u, D)


def _contract_d(M: Tensor, v: Tensor) -> Tensor:
    """``sum_d M[..., n, d] v[..., d]`` -> ``(..., n)``, as ``v^T M^T``: 2-4x faster than ``M v`` here."""
    return (v.unsqueeze(-2) @ M.transpose(-1, -2)).squeeze(-2)


def _delta_fn(delta_bias: Tensor | None, softplus: bool):
    """The elementwise map from the given delta to the recurrence's, ``softplus(delta + delta_bias)``
    (each part optional), on time-major (b, steps, d) slices; None when it is the identity."""
    if delta_bias is None and not softplus:
        return None

    def fn(t: Tensor) -> Tensor:
        t = t if delta_bias is None else t + delta_bias
        return F.softplus(t) if softplus else t

    return fn


class _ChunkedScan(torch.autograd.Function):
    """The whole of ``selective_scan`` on compute-dtype inputs (D, z, delta_bias may be None), with
    chunks of K steps processed in blocks of S (module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, K: int, S: int):
        (b, d, l), n = u.shape, A.shape[1]
        nc = -(-l // K)
        AT = A.t().contiguous()
        dl4 = _time_major(delta, nc, K, _delta_fn(delta_bias, softplus))  # the delta of the recurrence
        u4, B4, C4, z4 = (None if t is None else _time_major(t, nc, K) for t in (u, B, C, z))
        blocks = [(j0, min(j0 + S, K)) for j0 in range(0, K, S)]
        dA_buf, X_buf = u.new_empty(S, b, nc, n, d), u.new_empty(S, b, nc, n, d)

        def load(j0, j1):  # the block's decays and inputs
            dl, s = _block(dl4, j0, j1), j1 - j0
            return _decay(dl, AT, dA_buf[:s]), _inputs(dl * _block(u4, j0, j1), _block(B4, j0, j1), X_buf[:s])

        h = u.new_zeros(b, nc, n, d)
        H = torch.zeros_like(h)  # H[:, c]: the state entering chunk c
        # One chunk (K = l, the case whenever all chunks' states would pass _STATE_BYTES, as at the tiny
        # default) starts from zero: passes 1 and 2 are skipped, there is nothing to carry.
        if nc > 1:
            # 1. the state each chunk ends in from a zero start, all chunks at once (dA and X left intact)
            for j0, j1 in blocks:
                dA, X = load(j0, j1)
                for i in range(j1 - j0):
                    torch.addcmul(X[i], dA[i], h, out=h)
            # 2. carry across chunks with each chunk's total decay exp(A * sum(delta))
            chunk_decay = torch.exp(dl4.sum(2).unsqueeze(-2) * AT)  # (b, nc, n, d)
            for c in range(1, nc):
                torch.addcmul(h[:, c - 1], chunk_decay[:, c - 1], H[:, c - 1], out=H[:, c])
            del chunk_decay
        # 3. every chunk again from its true initial state, reading y_t = (<C_t, h_t> + D u_t) silu(z_t)
        y4 = u.new_empty(b, nc, K, d)
        h.copy_(H)
        for j0, j1 in blocks:
            if nc == 1 or len(blocks) > 1:  # else pass 1 left this one block's decays and inputs
                dA, X = load(j0, j1)
            hs = _run_states(h, dA, X)
            y = _readout(hs, _block(C4, j0, j1), _block(u4, j0, j1), D)
            _block(y4, j0, j1).copy_(y if z4 is None else y.mul_(F.silu(_block(z4, j0, j1))))
            h.copy_(hs[-1])  # a copy: the next block overwrites X
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, H)  # as given: no working copy is kept
        ctx.softplus, ctx.K, ctx.S = softplus, K, S
        last = h[:, -1].transpose(-1, -2).contiguous()  # (b, d, n)
        ctx.mark_non_differentiable(last)
        return y4.flatten(1, 2)[:, :l].transpose(1, 2), last  # time-major, as the projector reads it

    @staticmethod
    def backward(ctx, dy, _dlast):
        u, delta, A, B, C, D, z, delta_bias, H = ctx.saved_tensors
        K, S = ctx.K, ctx.S
        (b, d, l), n = u.shape, A.shape[1]
        nc = -(-l // K)
        AT = A.t().contiguous()
        dl4 = _time_major(delta, nc, K, _delta_fn(delta_bias, ctx.softplus))
        u4, B4, C4, z4, dy4 = (None if t is None else _time_major(t, nc, K) for t in (u, B, C, z, dy))
        blocks = [(j0, min(j0 + S, K)) for j0 in range(0, K, S)]
        dA_buf, X_buf, G_buf = (u.new_empty(S, b, nc, n, d) for _ in range(3))

        def decay(j0, j1):
            return _decay(_block(dl4, j0, j1), AT, dA_buf[: j1 - j0])

        def scan_grad(j0, j1):  # dL/d<C_t, h_t> = dy_t silu(z_t)
            dy_k = _block(dy4, j0, j1)
            return dy_k if z4 is None else dy_k * F.silu(_block(z4, j0, j1))

        def adjoint_inputs(j0, j1, dyp):  # C_t dy_t
            return torch.mul(_block(C4, j0, j1).unsqueeze(-1), dyp.unsqueeze(-2), out=G_buf[: j1 - j0])

        # One forward run through the blocks, for two things. (a) The state entering every block: H for
        # the first, then the recurrence. (b) Adjoint, pass 1: what each chunk alone passes back to the
        # state entering it, dL/dh from a zero end. That is linear in what arrives at each block's end,
        # so it is the sum over blocks of each block's own adjoint from a zero end, times the decay
        # from the chunk's start to the block's, exp(A * (sum of delta before it)) <= 1: the blocks can
        # be taken in forward order, sharing their decays with (a). With one chunk, (b) is not needed:
        # nothing arrives at its end.
        entering, back = [H], torch.zeros_like(H)
        delta_before = u.new_zeros(b, nc, d)  # sum of delta from the chunk's start to the block's
        for j0, j1 in blocks:
            dl_k = _block(dl4, j0, j1)
            dA = decay(j0, j1)  # the last block's: kept for pass 2
            if nc > 1:
                G = adjoint_inputs(j0, j1, scan_grad(j0, j1))  # the last block's: kept for pass 2
                c = torch.zeros_like(H)
                for i in reversed(range(j1 - j0)):
                    c.add_(G[i]).mul_(dA[i])
                back.addcmul_(torch.exp(delta_before.unsqueeze(-2) * AT), c)
                delta_before += dl_k.sum(0)
            if j1 < K:
                X = _inputs(dl_k * _block(u4, j0, j1), _block(B4, j0, j1), X_buf[: j1 - j0])
                entering.append(_run_states(entering[-1], dA, X)[-1].clone())
        # carry backwards across chunks: R[:, c] arrives at the end of chunk c from chunk c + 1
        R = torch.zeros_like(H)
        if nc > 1:
            chunk_decay = torch.exp(delta_before.unsqueeze(-2) * AT)
            for c in range(nc - 2, -1, -1):
                torch.addcmul(back[:, c + 1], chunk_decay[:, c + 1], R[:, c + 1], out=R[:, c])
            del chunk_decay
        del back
        # Adjoint, pass 2, block by block from the last: recompute the block's states h, run its
        # adjoints g, and read the gradients off them. With X_t = delta_t u_t B_t, dA_t = exp(delta_t A),
        # y'_t = <C_t, h_t> + D u_t, y_t = y'_t silu(z_t), dy'_t = dy_t silu(z_t), Q_t = g_t dA_t h_{t-1}:
        #   dC_t = sum_d h_t dy'_t     dB_t = sum_d g_t delta_t u_t      d(A) = sum_t,b Q_t delta_t
        #   du_t = delta_t sum_n g_t B_t + D dy'_t       ddelta_t = sum_n Q_t A + u_t sum_n g_t B_t
        #   dz_t = dy_t y'_t silu'(z_t)                  dD = sum_t,b dy'_t u_t
        # then ddelta through softplus and the bias. The padding steps add nothing to the sums over t:
        # there dy = u = delta = 0, so g = 0.
        du4, ddelta4 = u.new_empty(b, nc, K, d), u.new_empty(b, nc, K, d)
        dB4, dC4 = u.new_empty(b, nc, K, n), u.new_empty(b, nc, K, n)
        dz4 = None if z is None else u.new_empty(b, nc, K, d)
        dAT = torch.zeros_like(AT)
        dD = None if D is None else torch.zeros_like(D)
        dbias = None if delta_bias is None else torch.zeros_like(delta_bias)
        carry = R
        for (j0, j1), h0 in zip(reversed(blocks), reversed(entering)):
            dl_k, u_k, B_k, C_k, dy_k, z_k = (_block(t, j0, j1) for t in (dl4, u4, B4, C4, dy4, z4))
            du_k, dyp = dl_k * u_k, scan_grad(j0, j1)
            if j1 < K:  # (the last block's dA is still there, and its G if there are several chunks)
                dA, G = decay(j0, j1), adjoint_inputs(j0, j1, dyp)
            elif nc == 1:
                G = adjoint_inputs(j0, j1, dyp)
            hs = _run_states(h0, dA, _inputs(du_k, B_k, X_buf[: j1 - j0]))
            _block(dC4, j0, j1).copy_(_contract_d(hs, dyp))
            if z is not None:
                sig = torch.sigmoid(z_k)
                dsilu = sig.mul(z_k).mul_(1 - sig).add_(sig)  # silu'(z) = sig (1 + z (1 - sig))
                _block(dz4, j0, j1).copy_(_readout(hs, C_k, u_k, D).mul_(dy_k).mul_(dsilu))
            Q = _run_adjoints(carry, dA, G)  # P_t = dA_t g_t for now; G holds g
            carry = Q[0].clone()  # g passed on to the block before
            gB = (B_k.unsqueeze(-2) @ G).squeeze(-2)  # sum_n g B: (s, b, nc, d)
            _block(dB4, j0, j1).copy_(_contract_d(G, du_k))
            Q[0].mul_(h0)  # Q_t = P_t h_{t-1}
            Q[1:].mul_(hs[:-1])
            dAT += torch.mul(Q, dl_k.unsqueeze(-2), out=G).sum((0, 1, 2))  # G is free now
            ddelta = Q.mul_(AT).sum(-2).addcmul_(gB, u_k)
            if ctx.softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
                ddelta.mul_(torch.expm1(-dl_k).neg_())
            _block(ddelta4, j0, j1).copy_(ddelta)
            if dbias is not None:
                dbias += ddelta.sum((0, 1, 2))
            du = gB.mul_(dl_k)
            if D is not None:
                du.addcmul_(dyp, D)
                dD += (dyp * u_k).sum((0, 1, 2))
            _block(du4, j0, j1).copy_(du)
        # free the working tensors before the gradients are transposed back (the closures hold some)
        dl4 = u4 = B4 = C4 = z4 = dy4 = dA_buf = X_buf = G_buf = dA = G = Q = hs = entering = None
        grads = [_channel_major(g, like) for g, like in ((du4, u), (ddelta4, delta), (dB4, B), (dC4, C))]
        dz = None if z is None else _channel_major(dz4, z)
        return *grads[:2], dAT.t(), *grads[2:], dD, dz, dbias, None, None, None


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

    The last state is returned without gradient, as in mamba-ssm. ``y`` is laid out time-major (it is
    the transpose of a contiguous (b, l, d), which is what the projector's out_proj reads); any layout
    of the inputs is accepted, and delta and z laid out so are used without a copy.
    """
    b, d, l = u.shape
    n = A.shape[1]
    assert delta.shape == (b, d, l), f"delta {tuple(delta.shape)} != u {(b, d, l)}"
    assert A.shape == (d, n), f"A {tuple(A.shape)} != (d={d}, n)"
    assert B.shape == (b, n, l) and C.shape == (b, n, l), f"B/C {tuple(B.shape)}/{tuple(C.shape)} != {(b, n, l)}"

    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(compute) for t in (u, delta, A, B, C))
    D, z, delta_bias = (None if t is None else t.to(compute) for t in (D, z, delta_bias))
    kernel_fits = (CPU_KERNEL and chunk_size is None and b * d * l <= CPU_KERNEL_MAX and u.device.type == "cpu"
                   and compute == torch.float32)
    kernel = _cpu_kernel() if kernel_fits else None
    if kernel is not None:
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        y, last = kernel.apply(u, delta, A, B, C)
        if D is not None:
            y = y + D[:, None] * u
        if z is not None:
            y = y * F.silu(z)
        y = y.to(out_dtype)
        return (y, last.to(out_dtype)) if return_last_state else y
    K, S = _plan(b, d, l, n, u.element_size(), chunk_size)
    y, last = _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, K, S)
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
