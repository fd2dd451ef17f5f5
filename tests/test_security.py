"""Nothing from a shard or checkpoint is executed: no pickle is loaded, checkpoints load weights only."""

import io
import pickle
import tarfile

import pytest
import torch

from storm_lightning.data import ShardSource
from storm_lightning.data.datamodule import SampleProcessor, ShardStream
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
    assert [s["key"] for s in samples] == ["s0", "s1"]  # ...but here it is only bytes, never loaded
    assert not marker.exists()


def test_checkpoints_load_weights_only(tmp_path):
    """init_from uses torch.load(weights_only=True): a checkpoint carrying an object is refused."""
    from tests.test_model import tiny

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": WritesAFile(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError):
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
