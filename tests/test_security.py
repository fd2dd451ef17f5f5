"""Nothing from a shard or checkpoint is executed: no pickle is loaded, checkpoints load weights only."""

import io
import pickle
import tarfile

import pytest
import torch

from storm_lightning.data import ShardSource
from storm_lightning.data.samples import SampleProcessor
from storm_lightning.data.stream import ShardStream
from tests.conftest import TOKENIZER


class WritesAFile:
    """Unpickling this runs ``open(path, 'w')``: the payload of a malicious shard entry."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_entries_in_shards_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(WritesAFile(str(marker)))
    pickle.loads(payload).close()  # the payload does work when unpickled...
    assert marker.exists()
    marker.unlink()
    shard = tmp_path / "evil-000000.tar"
    json_bytes = b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo."}]}'
    with tarfile.open(shard, "w") as tar:
        for name, data in (("s0.json", json_bytes), ("s0.pyd", payload), ("s0.pkl", payload),
                           ("s1.pickle", payload), ("s1.json", json_bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stream = ShardStream([ShardSource("evil", str(shard))], [[str(shard)]], SampleProcessor(TOKENIZER, 16, 256),
                         infinite=False)
    samples = list(stream)
    assert [s.key for s in samples] == ["s0", "s1"]  # ...but here it is only bytes, never loaded
    assert not marker.exists()


def test_checkpoints_load_weights_only(tmp_path):
    """init_from uses torch.load(weights_only=True): a checkpoint carrying an object is refused."""
    from tests.test_model import tiny

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": WritesAFile(str(marker))}, tmp_path / "evil.ckpt")
    from storm_lightning.errors import UnsafeFileError

    with pytest.raises(UnsafeFileError, match="holds more than tensors and plain data, refused"):
        tiny(init_from=str(tmp_path / "evil.ckpt"))
    assert not marker.exists()


def test_remote_code_is_never_trusted():
    import inspect

    import storm_lightning.llm
    import storm_lightning.tokenizer
    import storm_lightning.vision

    for module in (storm_lightning.llm, storm_lightning.tokenizer, storm_lightning.vision):
        source = inspect.getsource(module)
        assert "trust_remote_code=True" not in source


# ---- sharded (torch.distributed.checkpoint) checkpoint folders ------------------------------------------

def sharded_checkpoint(folder, extra=None):
    """A DCP folder as FSDP2 writes it: tensors, an optimizer's plain-data entries, Lightning's meta.pt."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"w": torch.randn(3, 4)},
             "optimizer_0": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3, 4)}},
                             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "name": "llm", "params": ["w"]}]}}
    state["state_dict"].update(extra or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"global_step": 3, "loops": {"fit_loop": {"epoch": 0}}}, folder / "meta.pt")
    return folder


def evil_metadata(folder, marker):
    (folder / ".metadata").write_bytes(pickle.dumps(WritesAFile(str(marker))))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


def test_a_genuine_sharded_checkpoint_verifies(tmp_path):
    from storm_lightning.checkpoint import verify_sharded_checkpoint

    verify_sharded_checkpoint(sharded_checkpoint(tmp_path / "ok"))


@pytest.mark.parametrize("where", ["metadata", "bytes_entry", "meta_pt", "path_escape"])
def test_a_sharded_checkpoint_that_would_run_code_is_refused(tmp_path, marker, where):
    from storm_lightning.checkpoint import consolidate, verify_sharded_checkpoint
    from storm_lightning.errors import UnsafeFileError

    folder = sharded_checkpoint(tmp_path / "evil", extra={"note": WritesAFile(str(marker))}
                                if where == "bytes_entry" else None)
    marker.unlink(missing_ok=True)  # torch.save ran nothing, but be sure the fixture sees a clean state
    if where == "metadata":
        evil_metadata(folder, marker)
    elif where == "meta_pt":
        torch.save({"global_step": 3, "evil": WritesAFile(str(marker))}, folder / "meta.pt")
    elif where == "path_escape":  # an index that points storage reads at a file outside the folder
        from storm_lightning.checkpoint import _MetadataUnpickler

        with open(folder / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f, folder).load()
        for info in metadata.storage_data.values():
            info.relative_path = "../../etc/passwd"
        (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeFileError, match="refused"):
        verify_sharded_checkpoint(folder)
    with pytest.raises(UnsafeFileError):
        consolidate(str(folder), str(tmp_path / "out.ckpt"))
    assert not (tmp_path / "out.ckpt").exists()


def test_the_bytes_payload_is_live_without_verification(tmp_path, marker):
    """What the verification stands between: torch's own DCP loader runs the payload."""
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = sharded_checkpoint(tmp_path / "evil", extra={"note": WritesAFile(str(marker))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"state_dict": {"w": torch.zeros(3, 4), "note": None}}, checkpoint_id=str(folder), no_dist=True)
    assert marker.exists()
    marker.unlink()


def run_tool(name, *args):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(sys.executable).with_name(name)
    return subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_storm_consolidate_refuses_in_one_line(tmp_path, marker):
    folder = sharded_checkpoint(tmp_path / "evil")
    evil_metadata(folder, marker)
    proc = run_tool("storm-consolidate", folder, tmp_path / "out.ckpt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("storm-consolidate: error: ") and "refused" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fit", "test"])
def test_storm_fit_refuses_a_sharded_checkpoint_that_would_run_code(run_dir, marker, command):
    from tests.conftest import FAST, storm_fit

    folder = sharded_checkpoint(run_dir / "evil.ckpt")
    evil_metadata(folder, marker)
    proc = storm_fit(command, "--config", "conf/sft.yaml", "--config", "conf/fsdp.yaml", *FAST,
                     "--trainer.accelerator=cpu", "--trainer.devices=1", f"--ckpt_path={folder}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "storm-fit: error: " in proc.stderr and "refused" in proc.stderr


def test_shard_named_like_a_pipe_is_read_as_a_file(tmp_path, monkeypatch, marker):
    """webdataset runs a URL beginning with 'pipe:' as a shell command; a relative glob can yield one."""
    from tests.test_data import conv, write_tar

    monkeypatch.chdir(tmp_path)
    name = f"pipe:touch {marker.name};x.tar"
    write_tar(tmp_path / name, {"s0": {"json": conv("hi", "yo.")}})
    source = ShardSource("p", "pipe:*.tar")
    stream = ShardStream([source], [source.shard_paths("data.train_sources[0].shards")],
                         SampleProcessor(TOKENIZER, 16, 256), infinite=False)
    assert [s.key for s in stream] == ["s0"]
