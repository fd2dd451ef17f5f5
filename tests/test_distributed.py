"""Two CPU processes (gloo): FSDP2 training where one rank's batch is text only must not hang."""

import os
import socket
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import FAST, storm_fit

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir, hung: str) -> None:
    """``worker(rank, world, port, out_dir)`` in ``world`` spawned processes; fails with ``hung`` after 240 s."""
    context = mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.time() + 240
    while not context.join(timeout=5):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(hung)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from tests.test_model import make_batch, tiny

    torch.manual_seed(0)  # same initial weights on both ranks
    model = tiny()
    model._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    model._trainer = SimpleNamespace(world_size=world)
    model.configure_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1 + rank)
    # rank 0: text only; rank 1: a 4-frame video and an image (so different clip lengths too)
    batch = make_batch(model, frames=(0, 0) if rank == 0 else (4, 1))
    for _ in range(2):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
    digest = [float(v.float().abs().sum()) for _, v in sorted(state.items())]
    torch.save({"digest": digest, "vision_grad_seen": any(
        p.grad is not None for p in model.vision.parameters())}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_fsdp2_step_with_a_text_only_rank_does_not_hang(tmp_path):
    world = 2
    run_ranks(_worker, world, tmp_path, "FSDP2 step with a text-only rank hung (collectives out of step)")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert results[0]["digest"] == results[1]["digest"]  # one model: same full weights on both ranks
    assert all(r["vision_grad_seen"] for r in results)  # the text-only rank's vision shards got (zero) grads


def _sharded_load_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from storm_lightning.llm import HFCausalLM
    from tests.test_model import make_batch, tiny

    torch.manual_seed(0)
    llm = HFCausalLM(pretrained_path=f"{out_dir}/qwen2", sharded_load=True)
    model = tiny(llm=llm)
    model._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    model._trainer = SimpleNamespace(world_size=world)
    model.configure_model()
    head, embed = model.llm.model.lm_head.weight, model.llm.model.model.embed_tokens.weight
    gate = model.llm.model.model.layers[0].mlp.gate_proj.weight
    local_rows = [t.to_local().shape[0] for t in (embed, gate) if isinstance(t, DTensor)]
    loaded = get_model_state_dict(model.llm, options=StateDictOptions(full_state_dict=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)  # the same batch on both ranks (rank 1 drew the new vocabulary rows)
    loss = model(make_batch(model, frames=(4, 1)))["loss"]  # the loaded, sharded model trains
    loss.backward()
    optimizer.step()
    trained = get_model_state_dict(model.llm, options=StateDictOptions(full_state_dict=True))
    torch.save({"rows": local_rows, "tied": head is embed, "loss": float(loss), "loaded": loaded,
                "meta": [n for n, p in model.named_parameters() if p.is_meta],
                "trained": trained["model.model.embed_tokens.weight"]}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_sharded_load_reads_each_ranks_rows_of_a_pretrained_llm(tmp_path):
    """``sharded_load``: built on meta, sharded by FSDP2, then each rank reads its rows from the
    safetensors (indexed, several files): the tied head stays tied, the vocabulary grown for the media
    tokens keeps the checkpoint's rows, and the sharded model trains."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=63, vocab_size=611,
                                         tie_word_embeddings=True))
    qwen2.save_pretrained(tmp_path / "qwen2", max_shard_size="40KB")  # several files and an index
    assert (tmp_path / "qwen2/model.safetensors.index.json").is_file()
    world = 2
    run_ranks(_sharded_load_worker, world, tmp_path, "sharded loading hung")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # 620 rows (611 + media tokens), one half each; 63 MLP rows: 32 and 31 (torch.chunk's split)
    assert [r["rows"] for r in results] == [[310, 32], [310, 31]]
    assert all(r["tied"] and not r["meta"] and r["loss"] == results[0]["loss"] for r in results)
    for r in results:  # gathered: every tensor the checkpoint's, bit for bit, new vocabulary rows drawn
        for name, value in qwen2.state_dict().items():
            torch.testing.assert_close(r["loaded"][f"model.{name}"][:611], value, rtol=0, atol=0, msg=name)
        new_rows = r["loaded"]["model.model.embed_tokens.weight"][611:]
        assert new_rows.shape == (9, 32) and 0.01 < float(new_rows.std()) < 0.04  # initializer_range 0.02
        assert not torch.equal(r["trained"], r["loaded"]["model.model.embed_tokens.weight"])


def test_fsdp_config_trains_two_cpu_processes_and_saves_shards(run_dir):
    storm_fit("--config", "conf/sft.yaml", "--config", "conf/fsdp.yaml", *FAST,
              "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=3",
              "--trainer.val_check_interval=3")
    sharded = run_dir / "runs/sft/checkpoints/last.ckpt"
    shards = sorted(p.name for p in sharded.iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # one file per rank, never gathered
    # consolidated into one file, it loads for inference and resumes on one process
    from storm_lightning.checkpoint import consolidate
    from storm_lightning.inference import load_model

    checkpoint = consolidate(str(sharded), str(run_dir / "single.ckpt"))
    assert checkpoint["global_step"] == 3 and len(checkpoint["optimizer_states"]) == 1
    model, _ = load_model(str(run_dir / "single.ckpt"), config=str(run_dir / "runs/sft/config.yaml"))
    torch.testing.assert_close(model.state_dict()["llm.model.lm_head.weight"],
                               checkpoint["state_dict"]["llm.model.lm_head.weight"])
    # two readers' positions cannot carry over to one process: refused, unless a new data order is accepted
    args = ("--config", "conf/sft.yaml", *FAST, "--trainer.max_steps=4", "--trainer.callbacks.init_args.dirpath=runs/one",
            f"--ckpt_path={run_dir / 'single.ckpt'}")
    refused = storm_fit(*args, check=False)
    assert refused.returncode == 2 and "data.allow_data_restart=true" in refused.stderr
    storm_fit(*args, "--data.allow_data_restart=true")
    assert torch.load(run_dir / "runs/one/last.ckpt", weights_only=True)["global_step"] == 4


def test_fsdp_exact_resume_from_a_sharded_checkpoint(run_dir):
    """Two ranks: 2 steps, stop, resume from the sharded checkpoint to 4 == 4 steps straight."""
    from storm_lightning.checkpoint import consolidate

    args = ["--config", "conf/sft.yaml", "--config", "conf/fsdp.yaml", "--trainer.accelerator=cpu",
            "--trainer.devices=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            "--data.num_workers=1", "--model.schedule_steps=4", "--model.warmup_steps=1"]
    storm_fit(*args, "--trainer.max_steps=4", "--trainer.callbacks.init_args.dirpath=runs/straight")
    storm_fit(*args, "--trainer.max_steps=2", "--trainer.callbacks.init_args.dirpath=runs/split")
    storm_fit(*args, "--trainer.max_steps=4", "--trainer.callbacks.init_args.dirpath=runs/split",
              "--ckpt_path=runs/split/last.ckpt")
    straight = consolidate(str(run_dir / "runs/straight/last.ckpt"), str(run_dir / "straight.ckpt"))
    split = consolidate(str(run_dir / "runs/split/last.ckpt"), str(run_dir / "split.ckpt"))
    assert straight["global_step"] == split["global_step"] == 4
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(split["state_dict"][name], value, rtol=0, atol=0, msg=name)
