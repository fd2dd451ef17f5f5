"""Wall, user and kernel time and page faults of one training step, with and without keeping freed
host memory (``storm_lightning.host_memory``, what ``storm-fit`` does on a CPU).

    python benchmarks/bench_train_step.py --config conf/sft.yaml [--steps 5] [--sources video32]

Each setting runs in its own process (the malloc settings are per process): build the model and the
data from the config, take ``steps + 1`` training batches, run forward + backward + AdamW on the first
to warm up, then time the rest. ``--sources`` keeps only the named training sources (e.g. ``video32``
for batches of 32-frame clips only). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(config: str, steps: int, sources: list[str] | None) -> dict:
    import resource
    import time

    import torch
    from jsonargparse import ArgumentParser

    from storm_lightning.data import StormDataModule
    from storm_lightning.host_memory import keep_freed_memory
    from storm_lightning.inference import build_model

    kept = keep_freed_memory()  # a no-op when STORM_KEEP_FREED_MEMORY=0
    torch.manual_seed(0)
    model, data_cfg = build_model(config)
    data_cfg = dict(data_cfg, num_workers=0)  # decoding in this process: counted, and the same for both
    if sources:
        data_cfg["train_sources"] = [s for s in data_cfg["train_sources"] if s["name"] in sources]
    mix = ", ".join(f"{s['name']} {s.get('weight', 1.0)}" for s in data_cfg["train_sources"])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(StormDataModule, "data")
    data = parser.instantiate(parser.parse_object({"data": data_cfg})).data
    batches = iter(data.train_dataloader())
    batches = [next(batches) for _ in range(steps + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(batch):
        model(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {"kept": kept, "wall_s": (t1 - t0) / steps, "user_s": (r1.ru_utime - r0.ru_utime) / steps,
            "sys_s": (r1.ru_stime - r0.ru_stime) / steps, "page_faults": (r1.ru_minflt - r0.ru_minflt) // steps,
            "peak_rss_gib": r1.ru_maxrss / 2**20,
            "batch": f"{data.batch_size} samples from {mix}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/sft.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sources", nargs="*", help="keep only these training sources (by name)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(measure(opts.config, opts.steps, opts.sources)))
        return
    rows = []
    for keep in ("0", "1"):
        cmd = [sys.executable, __file__, "--child", "--config", opts.config, "--steps", str(opts.steps)]
        cmd += ["--sources", *opts.sources] if opts.sources else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "STORM_KEEP_FREED_MEMORY": keep, "HF_HUB_OFFLINE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{opts.config}: batches of {rows[0]['batch']}; {opts.steps} steps after one warm-up\n")
    print("| freed memory | wall per step | user CPU | kernel CPU | page faults | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = "kept (storm-fit on CPU)" if r["kept"] else "returned (glibc default)"
        print(f"| {label} | {r['wall_s']:.3f} s | {r['user_s']:.3f} s | {r['sys_s']:.3f} s | "
              f"{r['page_faults']:,} | {r['peak_rss_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
