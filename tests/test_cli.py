"""storm-fit end to end: the stage chain, swapping components from YAML and the command line, errors."""

import pytest

from tests.conftest import FAST, storm_fit

pytestmark = pytest.mark.slow


def test_stage_chain_align_sft_long(run_dir):
    storm_fit("--config", "conf/align.yaml", *FAST)
    assert (run_dir / "runs/align/checkpoints/last.ckpt").is_file()
    assert list((run_dir / "runs/align").glob("events.out.tfevents.*"))
    storm_fit("--config", "conf/sft.yaml", *FAST, "--model.init_from=runs/align/checkpoints/last.ckpt")
    assert (run_dir / "runs/sft/checkpoints/last.ckpt").is_file()
    storm_fit("--config", "conf/long.yaml", *FAST)  # init_from runs/sft/checkpoints/last.ckpt in the YAML
    assert (run_dir / "runs/long/checkpoints/last.ckpt").is_file()
    assert "TemporalAveragePool" in (run_dir / "runs/long/config.yaml").read_text()
    for command in ("validate", "test", "predict"):
        proc = storm_fit(command, "--config", "conf/long.yaml", "--ckpt_path=runs/long/checkpoints/last.ckpt",
                         "--model.init_from=null", f"--trainer.limit_{'val' if command == 'validate' else command}_batches=1",
                         "--trainer.enable_progress_bar=false", "--data.num_workers=0")
        assert proc.returncode == 0


def test_mlp_baseline_from_yaml_and_from_the_command_line(run_dir):
    storm_fit("--config", "conf/baseline_mlp.yaml", *FAST)
    storm_fit("--config", "conf/sft.yaml", *FAST, "--trainer.default_root_dir=runs/swap",
              "--model.projector.class_path=storm_lightning.projectors.MLPProjector",
              "--model.projector.init_args.hidden_dim=64")
    config = (run_dir / "runs/sft/config.yaml").read_text()
    assert "MLPProjector" in config and "hidden_dim: 64" in config


def test_compressors_added_and_removed_from_the_command_line(run_dir):
    storm_fit("--config", "conf/sft.yaml", *FAST,
              "--model.compressors+=SpatialAveragePool", "--model.compressors+=TemporalSample",
              "--model.compressors.init_args.stride=4")
    config = (run_dir / "runs/sft/config.yaml").read_text()
    assert "SpatialAveragePool" in config and "stride: 4" in config
    storm_fit("--config", "conf/long.yaml", *FAST, "--model.compressors=[]", "--model.init_from=null")
    assert "TemporalAveragePool" not in (run_dir / "runs/long/config.yaml").read_text()


def test_misconfigurations_name_the_key(run_dir):
    proc = storm_fit("--config", "conf/sft.yaml", *FAST, "--model.projector.init_args.output_dim=96", check=False)
    assert proc.returncode != 0
    assert "model.projector.init_args.output_dim=96 must equal the LLM hidden size 128" in proc.stderr
    proc = storm_fit("--config", "conf/sft.yaml", *FAST, "--model.projector.class_path=NoSuchProjector",
                     check=False)
    assert proc.returncode != 0 and "NoSuchProjector" in proc.stderr
    proc = storm_fit("--config", "conf/long.yaml", *FAST, check=False)  # no SFT checkpoint in this run_dir
    assert proc.returncode != 0 and "model.init_from: no such checkpoint 'runs/sft/checkpoints/last.ckpt'" in proc.stderr
