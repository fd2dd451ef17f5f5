"""Peak memory per rank of loading a pretrained LLM under FSDP2: transformers' whole-model loading on
every rank, then sharding (before), against ``sharded_load`` (after): built on the meta device, sharded,
then each rank reads only its own rows (``storm_lightning/sharded_load.py``).

    python benchmarks/bench_sharded_load.py                 # a 1.1 B Llama (TinyLlama's shape), 2 CPU ranks
    python benchmarks/bench_sharded_load.py --layers 4      # a quicker, smaller one

Makes the checkpoint once (random weights, bf16 safetensors, as published checkpoints are) in --dir.
Each rank builds the conf/sft.yaml STORM with that LLM (projector widened to its hidden size) and runs
``StormModel.configure_model`` on a 2-process gloo mesh, the code storm-fit runs under conf/fsdp.yaml.
Prints, per rank: peak RSS, its growth over the process after imports, and the rank's parameter bytes.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(directory: Path, layers: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    print(f"wrote {directory}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters (bf16)")


def rank_main(rank: int, world: int, port: int, directory: str, sharded: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from storm_lightning.inference import instantiate, model_config

    from transformers import LlamaForCausalLM  # noqa: F401  (imported before the baseline)

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model_cfg, _ = model_config("conf/sft.yaml")
    hidden = 2048
    model_cfg["projector"]["init_args"]["output_dim"] = hidden
    model_cfg["llm"] = {"class_path": "storm_lightning.llm.HFCausalLM",
                        "init_args": {"pretrained_path": directory, "sharded_load": sharded}}
    base = rss_mib()
    start = time.perf_counter()
    model = instantiate(model_cfg)
    model._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    model._trainer = SimpleNamespace(world_size=world)  # configure_model's check that it runs under a trainer
    model.configure_model()
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    local = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.llm.parameters())
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{peak_mib():.0f} {peak_mib() - base:.0f} {rss_mib():.0f} {local / 2**20:.0f} {seconds:.1f}\n")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/storm_bench_llm")
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: TinyLlama-1.1B's shape)")
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    directory = Path(args.dir) / f"llama-{args.layers}l"
    if not (directory / "config.json").is_file():
        ctx = mp.get_context("spawn")
        maker = ctx.Process(target=make_checkpoint, args=(directory, args.layers))
        maker.start()
        maker.join()
    print(f"{'loading':<34} {'rank':>4} {'peak RSS MiB':>13} {'growth MiB':>11} {'RSS after':>10} "
          f"{'LLM params MiB':>15} {'seconds':>8}")
    for sharded, name in ((False, "from_pretrained on every rank"), (True, "sharded_load")):
        out = Path(args.dir) / f"out-{int(sharded)}"
        out.mkdir(parents=True, exist_ok=True)
        mp.start_processes(rank_main, args=(args.ranks, free_port(), str(directory), sharded, str(out)),
                           nprocs=args.ranks, start_method="spawn")
        for rank in range(args.ranks):
            peak, growth, after, params, seconds = (out / f"rank{rank}.txt").read_text().split()
            print(f"{name:<34} {rank:>4} {peak:>13} {growth:>11} {after:>10} {params:>15} {seconds:>8}")


if __name__ == "__main__":
    main()
