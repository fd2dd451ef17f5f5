"""Every error a user can cause is one line naming the file or the key, for every command-line tool."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TOKENIZER


def run(module_main: str, *args) -> subprocess.CompletedProcess:
    module, main = module_main.split(":")
    return subprocess.run([sys.executable, "-c", f"from {module} import {main}; {main}()", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def one_line(proc, prog: str) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), proc.stderr[-3000:]
    return lines[0]


def test_chat_with_a_checkpoint_of_another_model(tmp_path):
    from tests.test_model import tiny

    torch.save({"state_dict": tiny().state_dict()}, tmp_path / "other.ckpt")
    line = one_line(run("storm_lightning.cli:chat_main", "--checkpoint", tmp_path / "other.ckpt", "--config",
                        "conf/sft.yaml", "--prompt", "hi"), "storm-chat")
    # a smaller model's checkpoint: refused before the config's model is built (a larger one's: by its shapes)
    assert "conf/sft.yaml: describes a model of 764,736 parameters, and " in line and "other.ckpt holds" in line


def test_a_config_naming_classes_outside_storm_lightning_imports_nothing(tmp_path):
    """An export's config.json or a run's config.yaml (both may come from anyone) name storm_lightning's
    classes only, unless the user trusts more modules; an export's tokenizer is inside it."""
    import shutil

    import yaml

    from storm_lightning.inference import load_config

    model = load_config(str(ROOT / "conf/sft.yaml"))["model"]
    model["projector"] = {"class_path": "collections.OrderedDict"}
    model["tokenizer_path"] = "tokenizer"
    (tmp_path / "export").mkdir()
    shutil.copytree(TOKENIZER, tmp_path / "export/tokenizer")
    (tmp_path / "export/config.json").write_text(json.dumps({"format": "storm-lightning", "model": model}))
    line = one_line(run("storm_lightning.cli:chat_main", "--checkpoint", tmp_path / "export", "--prompt", "hi"),
                    "storm-chat")
    assert "config.json: names classes outside storm_lightning: ['collections.OrderedDict']" in line
    model["tokenizer_path"] = "../tokenizer"
    (tmp_path / "export/config.json").write_text(json.dumps({"format": "storm-lightning", "model": model}))
    line = one_line(run("storm_lightning.cli:chat_main", "--checkpoint", tmp_path / "export", "--prompt", "hi"),
                    "storm-chat")
    assert "model.tokenizer_path must be a folder inside the export directory, got '../tokenizer'" in line

    config = yaml.safe_load((ROOT / "conf/sft.yaml").read_text())  # a downloaded run: config.yaml + a .ckpt
    config["model"]["compressors"] = [{"class_path": "this.Foo"}]  # importing `this` prints the Zen of Python
    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": {}}, tmp_path / "run/checkpoints/last.ckpt")
    for command in ("chat_main", "export_main"):
        args = ["--prompt", "hi"] if command == "chat_main" else ["--out", tmp_path / "out"]
        result = run(f"storm_lightning.cli:{command}", "--checkpoint", tmp_path / "run/checkpoints/last.ckpt", *args)
        assert "Beautiful is better than ugly" not in result.stdout + result.stderr
        assert "names classes outside storm_lightning: ['this.Foo'] (to load your own components, name their " \
               "modules in STORM_TRUSTED_MODULES" in one_line(result, "storm-" + command.replace("_main", ""))


@pytest.mark.parametrize("args, message", [(["--frames", "0"], "--frames must all be >= 1"),
                                           (["--config", "nope.yaml"], "no such file 'nope.yaml'"),
                                           (["--frames", "100000"], "--frames must all be <= 1024"),  # 4.9 GB
                                           (["--device", "tpu"], "--device='tpu': not a torch device"),
                                           (["--out", "conf"], "--out conf: is a folder")])
def test_profile_arguments(args, message):
    assert message in one_line(run("storm_lightning.profile:main", *args), "storm-profile")


def test_consolidate_a_folder_that_is_not_a_checkpoint(tmp_path):
    line = one_line(run("storm_lightning.checkpoint:consolidate_main", tmp_path, tmp_path / "out.ckpt"),
                    "storm-consolidate")
    assert "is not a sharded checkpoint folder" in line
