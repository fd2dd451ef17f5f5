"""Wall, user and kernel time and page faults of one training step, with and without keeping freed
host memory (``storm_lightning.host_memory``, what ``storm-fit`` does on a CPU), or with and without
packing the LLM's batch (``model.pack_sequences``).

    python benchmarks/bench_train_step.py --config conf/sft.yaml [--steps 5] [--sources video32]
    python benchmarks/bench_train_step.py --config conf/sft.yaml --compare packing

Each setting runs in its own process (the malloc settings are per process): build the model and the
data from the config, take ``steps + 1`` training batches, run forward + backward + AdamW on the first
to warm up, then time the rest. Every source is drawn from the first batch (``start_step`` set to 0):
the batches are those of the mixed phase of a curriculum, where the time goes. ``--sources`` keeps
only the named training sources (e.g. ``video32`` for batches of 32-frame clips only). With
``--compare packing``: the padding fraction of the LLM's input (padded positions of the (B, L) batch
over all of them; a packed batch has none) and the real LLM tokens per second of training step.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(config: str, steps: int, sources: list[str] | None, pack: bool | None) -> dict:
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
    if pack is not None:
        model.hparams.pack_sequences = pack
    data_cfg = dict(data_cfg, num_workers=0)  # decoding in this process: counted, and the same for both
    data_cfg["train_sources"] = [dict(s, start_step=0) for s in data_cfg["train_sources"]
                                 if not sources or s["name"] in sources]
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
    with torch.no_grad():  # the LLM's input as a padded batch: real tokens and the (B, L) rectangle
        shapes = [model.expand_inputs(b)["attention_mask"] for b in batches[1:]]
    real, rectangle = sum(int(m.sum()) for m in shapes), sum(m.numel() for m in shapes)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {"kept": kept, "pack": model.hparams.pack_sequences, "padding": 1 - real / rectangle,
            "llm_tokens_per_s": real / (t1 - t0), "wall_s": (t1 - t0) / steps, "user_s": (r1.ru_utime - r0.ru_utime) / steps,
            "sys_s": (r1.ru_stime - r0.ru_stime) / steps, "page_faults": (r1.ru_minflt - r0.ru_minflt) // steps,
            "peak_rss_gib": r1.ru_maxrss / 2**20,
            "batch": f"{data.batch_size} samples from {mix}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/sft.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sources", nargs="*", help="keep only these training sources (by name)")
    parser.add_argument("--compare", choices=["host-memory", "packing"], default="host-memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pack", choices=["0", "1"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        pack = None if opts.pack is None else opts.pack == "1"
        print(json.dumps(measure(opts.config, opts.steps, opts.sources, pack)))
        return
    settings = [("1", "0"), ("1", "1")] if opts.compare == "packing" else [("0", None), ("1", None)]
    rows = []
    for keep, pack in settings:
        cmd = [sys.executable, __file__, "--child", "--config", opts.config, "--steps", str(opts.steps)]
        cmd += ["--sources", *opts.sources] if opts.sources else []
        cmd += ["--pack", pack] if pack else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "STORM_KEEP_FREED_MEMORY": keep, "HF_HUB_OFFLINE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{opts.config}: batches of {rows[0]['batch']}; {opts.steps} steps after one warm-up\n")
    if opts.compare == "packing":
        print("| LLM batch | padding | LLM tokens / s | wall per step | user CPU | peak RSS |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            label, padding = ("packed", 0.0) if r["pack"] else ("padded", r["padding"])
            print(f"| {label} | {padding:.1%} | {r['llm_tokens_per_s']:,.0f} | {r['wall_s']:.3f} s | "
                  f"{r['user_s']:.3f} s | {r['peak_rss_gib']:.2f} GiB |")
        return
    print("| freed memory | wall per step | user CPU | kernel CPU | page faults | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = "kept (storm-fit on CPU)" if r["kept"] else "returned (glibc default)"
        print(f"| {label} | {r['wall_s']:.3f} s | {r['user_s']:.3f} s | {r['sys_s']:.3f} s | "
              f"{r['page_faults']:,} | {r['peak_rss_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
