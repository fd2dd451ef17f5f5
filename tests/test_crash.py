"""Crash safety: atomic checkpoint saves, and a run killed with SIGKILL resumes from its last checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from storm_lightning.checkpoint import AtomicCheckpointIO
from tests.conftest import storm_fit


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def last_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(run_dir):
    ckpt = run_dir / "runs/sft/checkpoints/last.ckpt"
    args = ["--config", "conf/sft.yaml", "--trainer.max_steps=200", "--trainer.limit_val_batches=0",
            "--trainer.callbacks.init_args.every_n_train_steps=3", "--trainer.enable_progress_bar=false",
            "--data.num_workers=0"]
    cmd = [sys.executable, "-c", "from storm_lightning.cli import fit_main; fit_main()", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (ckpt.exists() and last_step(ckpt) >= 6):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: mid-step or mid-save
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = last_step(ckpt)  # the last checkpoint is whole and loadable
    assert saved >= 6 and saved % 3 == 0
    done = storm_fit(*args, f"--trainer.max_steps={saved + 4}", f"--ckpt_path={ckpt}")
    assert "Restoring states from the checkpoint path" in done.stdout + done.stderr
    # resumed at `saved`, so only the steps after it were redone; the final step is saved too, although
    # it is not a multiple of every_n_train_steps
    assert last_step(ckpt) == saved + 4


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_matches_an_uninterrupted_run(run_dir, workers):
    """Stopped at step 3 and resumed to 6 == 6 steps straight: weights, optimizer, schedule, data (with
    clips joining the mix at step 4, after the resume)."""
    sources = ('[{name: image, shards: "data_shards/train/image-{000000..000003}.tar", weight: 0.6}, '
               '{name: video32, shards: "data_shards/train/video32-{000000..000003}.tar", weight: 0.4, '
               'frames_per_clip: 8, start_step: 4}]')
    args = ["--config", "conf/sft.yaml", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--data.num_workers={workers}", "--model.schedule_steps=6", "--model.warmup_steps=2",
            f"--data.train_sources={sources}"]
    storm_fit(*args, "--trainer.max_steps=6", "--trainer.callbacks.init_args.dirpath=runs/straight")
    storm_fit(*args, "--trainer.max_steps=3", "--trainer.callbacks.init_args.dirpath=runs/split")
    storm_fit(*args, "--trainer.max_steps=6", "--trainer.callbacks.init_args.dirpath=runs/split",
              "--ckpt_path=runs/split/last.ckpt")
    straight = torch.load(run_dir / "runs/straight/last.ckpt", weights_only=True)
    split = torch.load(run_dir / "runs/split/last.ckpt", weights_only=True)
    assert straight["global_step"] == split["global_step"] == 6
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(split["state_dict"][name], value, rtol=0, atol=0, msg=name)
    moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(straight["optimizer_states"][0]["state"].values(),
                                                             split["optimizer_states"][0]["state"].values())]
    assert all(torch.equal(a, b) for a, b in moments)
