"""Benchmark the Mamba mixer on the CPU: our chunked scan vs transformers' MambaMixer fallback.

    python benchmarks/bench_scan.py            # everything (the transformers reference takes minutes)
    python benchmarks/bench_scan.py --quick    # skip the reference at (2, 2048, 256)
    python benchmarks/bench_scan.py --scan     # the scan alone: time at the tiny default, peak memory at large shapes
    python benchmarks/bench_scan.py --scan --shapes 1x1024x16384x16   # ... at the shapes given (b x d x l x n)
    python benchmarks/bench_scan.py --scan --threads 1   # torch's thread count (default: its own choice)

Every measurement runs as storm-fit runs on a CPU: freed host memory kept (storm_lightning.host_memory).

Prints, for one mixer layer (forward direction, the same weights in both): forward and forward+backward
times, their ratio, and the largest output difference; then the projector's share of a full StormModel
forward on the tiny default config (conf/sft.yaml), and the peak memory of a 2-layer projector on a
128-frame x 64-token clip.

``--scan`` benchmarks ``selective_scan`` alone, called as the projector calls it (D, z, delta_bias,
softplus), on both CPU paths (numba's fused loops, the default, and the chunked PyTorch scan):
forward+backward time at the tiny default's shapes (medians, in this process), then, for each large
shape in a fresh subprocess, the time of one forward+backward and the growth of peak resident memory
(VmHWM) over the resident memory measured once the inputs and the output gradient exist. The growth
includes what forward+backward must return: y and the gradients of u, delta and z, 4 (b, d, l) tensors
(the "floor" column).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from storm_lightning.host_memory import keep_freed_memory  # noqa: E402


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mixer_pair(width: int, d_state: int = 16, expand: int = 2):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from storm_lightning.projectors import BiMambaMixer

    torch.manual_seed(0)
    ours = BiMambaMixer(width, d_state=d_state, expand=expand, bidirectional=False, backend="torch")
    config = MambaConfig(hidden_size=width, state_size=d_state, expand=expand, conv_kernel=4,
                         time_step_rank=ours.dt_rank, use_bias=False, use_conv_bias=True)
    reference = MambaMixer(config, layer_idx=0)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def bench_mixer(batch: int, length: int, width: int, repeats: int, reference_repeats: int) -> None:
    from storm_lightning.projectors import BiMambaMixer

    ours, reference = mixer_pair(width)
    bidir = BiMambaMixer(width, backend="torch")
    x = torch.randn(batch, length, width)

    def fwd(m):
        with torch.no_grad():
            return m(x)

    def fwd_bwd(m):
        xg = x.clone().requires_grad_()
        m(xg).square().mean().backward()

    print(f"\n== one mixer layer, (batch, tokens, width) = ({batch}, {length}, {width}), d_state 16, expand 2")
    t_ours_f, t_ours_fb = median_time(lambda: fwd(ours), repeats), median_time(lambda: fwd_bwd(ours), repeats)
    t_bi_fb = median_time(lambda: fwd_bwd(bidir), repeats)
    print(f"ours (torch scan)        forward {t_ours_f * 1e3:9.1f} ms   forward+backward {t_ours_fb * 1e3:9.1f} ms")
    print(f"ours, bidirectional      {'':26} forward+backward {t_bi_fb * 1e3:9.1f} ms")
    if reference_repeats == 0:
        print("transformers MambaMixer  skipped (--quick)")
        return
    t_ref_f = median_time(lambda: fwd(reference), reference_repeats, warmup=0)
    t_ref_fb = median_time(lambda: fwd_bwd(reference), reference_repeats, warmup=0)
    diff = (fwd(ours) - fwd(reference)).abs().max().item()
    scale = fwd(reference).abs().max().item()
    print(f"transformers MambaMixer  forward {t_ref_f * 1e3:9.1f} ms   forward+backward {t_ref_fb * 1e3:9.1f} ms")
    print(f"speed-up                 forward {t_ref_f / t_ours_f:9.1f} x    forward+backward {t_ref_fb / t_ours_fb:9.1f} x")
    print(f"max |ours - reference| = {diff:.2e} (max |reference| = {scale:.2e})")


def bench_model_share(repeats: int) -> None:
    from storm_lightning.data import ShardSource, StormDataModule
    from storm_lightning.inference import build_model

    os.chdir(ROOT)
    model, data = build_model("conf/sft.yaml")
    model.eval()
    dm = StormDataModule([ShardSource(**s) for s in data["train_sources"]], tokenizer_path=data["tokenizer_path"],
                         image_size=data["image_size"], batch_size=data["batch_size"], num_workers=0)
    batches = iter(dm.train_dataloader())
    batch = next(b for b in batches if int((b.frames_per_sample == 32).sum()) >= 3)

    timings: dict[str, list[float]] = {}

    def timed(name, module):
        def pre(*_):
            timings.setdefault(name, []).append(-time.perf_counter())

        def post(*_):
            timings[name][-1] += time.perf_counter()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for name in ("vision", "downsampler", "projector"):
        timed(name, getattr(model, name))
    for c in model.compressors:
        timed("compressors", c)

    def forward():  # what StormModel.forward runs, up to the LM head
        with torch.no_grad():
            inputs, attention, _ = model.build_inputs(batch)  # vision .. compressors, timed by the hooks
            timings.setdefault("llm", []).append(-time.perf_counter())
            model.llm.model.get_decoder()(inputs_embeds=inputs, attention_mask=attention)
            timings["llm"][-1] += time.perf_counter()

    total = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        forward()
        total.append(time.perf_counter() - start)
    frames = batch.frames_per_sample.tolist()
    print(f"\n== share of a StormModel forward, tiny default (conf/sft.yaml), batch frames {frames}")
    med_total = statistics.median(total[1:])
    for name, ts in timings.items():
        med = statistics.median(ts[1:])
        print(f"{name:12s} {med * 1e3:8.1f} ms  {100 * med / med_total:5.1f} %")
    print(f"{'total':12s} {med_total * 1e3:8.1f} ms  (build_inputs included)")


PEAK = """
import resource, time, torch
from storm_lightning.projectors import MambaTemporalProjector
p = MambaTemporalProjector({w}, {w}, num_layers=2)
x = torch.randn(1, 128, 64, {w}, requires_grad=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); p(x).square().mean().backward(); t = time.perf_counter() - t
print(f"{{t:.1f}} {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}}")
"""


def bench_peak_memory(width: int) -> None:
    out = subprocess.run([sys.executable, "-c", PEAK.format(w=width)], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    print(f"\n== 2-layer projector, one clip of 128 frames x 64 tokens (8192 tokens), width {width}")
    print(f"forward+backward {out[0]} s, peak resident memory of the process {out[1]} GiB")


def scan_inputs(b: int, d: int, l: int, n: int, seed: int = 0) -> dict:
    """The projector's call (BiMambaMixer._scan_direction): softplus(delta + delta_bias), A = -exp(A_log),
    D and z gating, everything trained, in the projector's memory layouts: u (the convolution's output)
    is a contiguous (b, d, l); delta and z are transposes of (b, l, .) linear outputs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x = {"u": r(b, d, l), "delta": (r(b, l, d) - 4).transpose(1, 2), "A": -torch.exp(r(d, n)), "B": r(b, n, l),
         "C": r(b, n, l), "D": r(d), "z": r(b, l, 2 * d)[..., d:].transpose(1, 2), "delta_bias": r(d) * 0.1}
    return {k: v.requires_grad_() for k, v in x.items()}


def scan_grad(b: int, d: int, l: int) -> torch.Tensor:
    """The gradient reaching y in the projector: out_proj's input is y.transpose(1, 2), so it is a transpose."""
    return torch.randn(b, l, d).transpose(1, 2)


PATHS = ("numba", "chunked")


def scan_fwd_bwd(x: dict, dy: torch.Tensor, path: str = "numba") -> None:
    import importlib

    from storm_lightning.ops import selective_scan

    importlib.import_module("storm_lightning.ops.selective_scan").CPU_KERNEL = path == "numba"
    for v in x.values():
        v.grad = None
    selective_scan(**x, delta_softplus=True).backward(dy)


def bench_scan_time(b: int, d: int, l: int, n: int, repeats: int) -> None:
    x = scan_inputs(b, d, l, n)
    dy = scan_grad(b, d, l)
    times = {path: median_time(lambda: scan_fwd_bwd(x, dy, path), repeats, warmup=2) for path in PATHS}
    print(f"scan alone (b, d, l, n) = ({b}, {d}, {l}, {n})  forward+backward: "
          + ", ".join(f"{path} {t * 1e3:7.1f} ms" for path, t in times.items()))


SCAN_PEAK = """
import sys, time, torch
torch.set_num_threads({threads})
sys.path.insert(0, {root!r})
from storm_lightning.host_memory import keep_freed_memory
keep_freed_memory()
from benchmarks.bench_scan import scan_inputs, scan_grad, scan_fwd_bwd

def status(key):  # kB -> bytes
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

scan_fwd_bwd(scan_inputs(1, 8, 64, 4), scan_grad(1, 8, 64), {path!r})  # load and initialise everything first
x = scan_inputs({b}, {d}, {l}, {n})
dy = scan_grad({b}, {d}, {l})
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
    f.write("5")
t = time.perf_counter()
scan_fwd_bwd(x, dy, {path!r})
t = time.perf_counter() - t
print(t, status("VmHWM:") - base, base)
"""


def bench_scan_memory(b: int, d: int, l: int, n: int, path: str) -> None:
    code = SCAN_PEAK.format(root=ROOT, b=b, d=d, l=l, n=n, threads=torch.get_num_threads(), path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    shape = f"{path:8s}({b}, {d}, {l}, {n})"
    if out.returncode != 0:
        print(f"{shape:30s} failed: {out.stderr.strip().splitlines()[-1:]}")
        return
    t, growth, base = (float(v) for v in out.stdout.split())
    bdl, full = b * d * l * 4, b * d * l * n * 4
    print(f"{shape:30s} {t:8.1f} s  {growth / 2**30:8.2f} GiB  {4 * bdl / 2**30:8.2f} GiB  "
          f"{bdl / 2**30:8.3f} GiB  {full / 2**30:8.2f} GiB  (inputs resident: {base / 2**30:.2f} GiB)")


def bench_scan(shapes: list[tuple[int, int, int, int]], repeats: int) -> None:
    print("\n== selective_scan alone, as the projector calls it, float32")
    bench_scan_time(8, 128, 512, 8, repeats)  # tiny default: 8 clips x 32 frames x 16 tokens, d_inner 128
    bench_scan_time(8, 256, 512, 16, repeats)  # the same clips at Mamba's usual expand 2, d_state 16
    bench_scan_time(2, 256, 512, 16, repeats)
    print(f"\n{'path (b, d, l, n)':30s} {'fwd+bwd':>10s}  {'peak RSS growth':>12s}  {'floor':>8s}  "
          f"{'one (b,d,l)':>12s}  {'one (b,d,l,n)':>12s}")
    for shape in shapes:
        for path in PATHS:
            bench_scan_memory(*shape, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the slow reference at (2, 2048, 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan", action="store_true", help="benchmark selective_scan alone (time and peak memory)")
    parser.add_argument("--shapes", default="1x1024x16384x16,1x7168x8192x16",
                        help="with --scan: comma-separated b x d x l x n for the peak-memory runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    keep_freed_memory()  # as storm-fit on a CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.scan:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
        bench_scan(shapes, args.repeats)
        return
    bench_mixer(2, 2048, 256, args.repeats, reference_repeats=0 if args.quick else 1)
    bench_mixer(4, 512, 128, args.repeats, reference_repeats=1)  # tiny default: 32 frames x 16 tokens
    bench_model_share(args.repeats)
    bench_peak_memory(256)


if __name__ == "__main__":
    main()
