import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ROOT / "data_shards"
TOKENIZER = str(SHARDS / "tokenizer")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A working directory with conf/ and data_shards/ linked in: CLI runs write runs/ there."""
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "data_shards").symlink_to(SHARDS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def storm_fit(*args: str, check: bool = True):
    """Run the real ``storm-fit`` entry point in a subprocess; returns the CompletedProcess."""
    import subprocess

    # the installed console script, as users run it (Lightning's multi-process launcher re-runs argv)
    cmd = [sys.executable, str(Path(sys.executable).with_name("storm-fit")), *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")  # Lightning's result table, unwrapped
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"storm-fit {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


FAST = ("--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0")
