"""storm-fit end to end: the stage chain, swapping components from YAML and the command line, errors."""

import sys

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
    trained_config = (run_dir / "runs/long/config.yaml").read_text()
    assert "TemporalAveragePool" in trained_config
    for command in ("validate", "test", "predict"):
        proc = storm_fit(command, "--config", "conf/long.yaml", "--ckpt_path=runs/long/checkpoints/last.ckpt",
                         "--model.init_from=null", f"--trainer.limit_{'val' if command == 'validate' else command}_batches=1",
                         "--trainer.enable_progress_bar=false", "--data.num_workers=0",
                         "--model.compressors+=TemporalSample")  # a test-time compression
        assert proc.returncode == 0
        # recorded beside the run, never over the trained model's config (storm-chat and resume read it)
        assert "TemporalSample" in (run_dir / f"runs/long/{command}_config.yaml").read_text()
    assert (run_dir / "runs/long/config.yaml").read_text() == trained_config


def test_mlp_baseline_from_yaml_and_from_the_command_line(run_dir):
    proc = storm_fit("--config", "conf/baseline_mlp.yaml", *FAST)
    if sys.platform.startswith("linux"):  # CPU runs keep freed host memory (storm_lightning.host_memory)
        assert "freed blocks are kept" in proc.stdout + proc.stderr
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


def test_token_budget_batches_with_the_counts_linked_from_the_model(run_dir):
    storm_fit("--config", "conf/long.yaml", *FAST, "--model.init_from=null", "--data.token_budget=1200")
    assert (run_dir / "runs/long/checkpoints/last.ckpt").is_file()


def test_resuming_a_checkpoint_of_another_model_is_one_line(run_dir):
    storm_fit("--config", "conf/baseline_mlp.yaml", *FAST)
    line = config_error_line(storm_fit("--config", "conf/sft.yaml", *FAST, "--trainer.max_steps=4",
                                       "--ckpt_path=runs/baseline_mlp/checkpoints/last.ckpt", check=False))
    assert "--ckpt_path is a checkpoint of another model than this config's" in line


def config_error_line(proc) -> str:
    """The one line a config error prints (and nothing like a traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("storm-fit: config error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--model.projector.init_args.output_dim=96"],
     "model.projector.init_args.output_dim=96 must equal the LLM hidden size 128"),
    (["--model.projector.class_path=NoSuchProjector"], 'Parser key "model.projector"'),
    (["--model.no_such_key=1"], "unrecognized arguments: --model.no_such_key=1"),
    (["--model.lr_llm=fast"], 'Parser key "model.lr_llm": Expected a <class \'float\'>'),
    (["--model.compressors+=SpatialAveragePool", "--model.compressors.init_args.kernel_size=3"],
     "model.compressors[1] (SpatialAveragePool): SpatialAveragePool kernel_size=3 must divide the 4x4 token grid"),
    (["--data.image_size=32"], "data.image_size=32 must equal the vision backbone's image size 64"),
    (["--model.init_from=missing.ckpt"], "model.init_from: no such checkpoint file 'missing.ckpt'"),
    (["--data.tokenizer_path=nowhere"], "data.tokenizer_path (linked to model.tokenizer_path): 'nowhere' is not a tokenizer"),
    (["--data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    (["--model.lr_llm=-1"], "model.lr_llm must be a finite number >= 0, got -1.0"),  # gradient ascent, before
    (["--data.batch_size=-1"], "data.batch_size must be >= 1, got -1"),
    (["--data.num_workers=-2"], "data.num_workers must be >= 0, got -2"),
    (["--data.train_sources=[{name: t, shards: data_shards/train/text-000000.tar, weight: .nan}]"],
     "data.train_sources[0] ('t'): weight must be a finite number >= 0"),
    (["--model.vision.init_args.patch_size=0"], "model.vision.init_args: {'patch_size': 0, 'hidden_size': 64"),
    (["--model.llm.init_args.num_layers=0"], "model.llm.init_args: hidden_size, num_layers"),
])
def test_misconfigurations_are_one_line_naming_the_key(run_dir, args, expected):
    line = config_error_line(storm_fit("--config", "conf/sft.yaml", *FAST, *args, check=False))
    assert expected in line


def test_yaml_errors_are_one_line(run_dir):
    (run_dir / "bad_shards.yaml").write_text(
        "data:\n  train_sources:\n    - {name: lost, shards: 'no/such-{000..003}.tar'}\n")
    line = config_error_line(storm_fit("--config", "conf/sft.yaml", "--config", "bad_shards.yaml", *FAST, check=False))
    assert "data.train_sources[0].shards: no shard matches 'no/such-{000..003}.tar'" in line
    (run_dir / "bad_key.yaml").write_text("model:\n  lr_lm: 0.1\n")
    line = config_error_line(storm_fit("--config", "conf/sft.yaml", "--config", "bad_key.yaml", *FAST, check=False))
    assert "lr_lm" in line
    line = config_error_line(storm_fit("--config", "conf/long.yaml", *FAST, check=False))  # no SFT run here
    assert "model.init_from: no such checkpoint file 'runs/sft/checkpoints/last.ckpt'" in line
