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


def test_the_rename_is_made_durable_by_syncing_the_folder(tmp_path, monkeypatch):
    import storm_lightning.checkpoint as checkpoint

    calls = []
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: calls.append(("replace", b)) or os.rename(a, b))
    monkeypatch.setattr(checkpoint, "fsync_dir", lambda folder: calls.append(("fsync_dir", folder)))
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, tmp_path / "last.ckpt")
    assert calls == [("replace", tmp_path / "last.ckpt"), ("fsync_dir", tmp_path)]


def test_stale_temporaries_of_dead_savers_are_removed(tmp_path):
    from storm_lightning.checkpoint import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".last.ckpt.tmp{dead.pid}", tmp_path / f".last.ckpt.tmp{os.getpid()}"
    for path in (stale, live, tmp_path / "last.ckpt"):
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "last.ckpt"])


def last_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(run_dir):
    ckpt = run_dir / "runs/sft/checkpoints/last.ckpt"
    args = ["--config", "conf/sft.yaml", "--trainer.max_steps=200", "--trainer.limit_val_batches=0",
            "--trainer.callbacks.init_args.every_n_train_steps=3", "--trainer.enable_progress_bar=false",
            "--data.num_workers=0"]
    cmd = [sys.executable, "-c", "from storm_lightning.fit import fit_main; fit_main()", *args]
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
    stale = ckpt.with_name(f".last.ckpt.tmp{proc.pid}")  # what a kill during a save leaves
    stale.write_bytes(b"half a checkpoint")
    done = storm_fit(*args, f"--trainer.max_steps={saved + 4}", f"--ckpt_path={ckpt}")
    assert "Restoring states from the checkpoint path" in done.stdout + done.stderr
    # resumed at `saved`, so only the steps after it were redone; the final step is saved too, although
    # it is not a multiple of every_n_train_steps
    assert last_step(ckpt) == saved + 4
    assert not stale.exists()  # removed when the resumed run started


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


STALLED_DATA = ("import time\n"
                "from storm_lightning.data import datamodule\n"
                "datamodule.SampleProcessor.__call__ = lambda self, raw, source: time.sleep(1000)\n"
                "from storm_lightning.fit import fit_main\n"
                "fit_main()\n")


@pytest.mark.slow
@pytest.mark.parametrize("workers, group", [(0, False), (1, False), (2, True)])
def test_sigterm_stops_a_run_stalled_in_data_loading(run_dir, workers, group):
    """Lightning stops on SIGTERM only between steps; a reader that never returns must not keep the run.
    ``group``: the signal goes to every process of the run, data workers included (SLURM, Ctrl-C)."""
    proc = subprocess.Popen([sys.executable, "-c", STALLED_DATA, "--config", "conf/sft.yaml",
                             f"--data.num_workers={workers}", "--trainer.enable_progress_bar=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group)
    try:
        time.sleep(12)  # built, and waiting for its first batch
        assert proc.poll() is None
        start = time.time()
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and time.time() - start < 15
    assert "storm-fit: stopped by SIGTERM" in err and "Traceback" not in err
    assert not list(run_dir.glob("runs/**/.*.tmp*"))
