"""benchmarks/temporal_signal.py and benchmarks/task_learnability.py, on the tiny default."""

import math
import sys

import numpy as np
import pytest

from benchmarks import task_learnability
from benchmarks.temporal_signal import GRAD_GROUPS, clips, grad_group, measure
from storm_lightning.inference import build_model
from tests.conftest import ROOT, TOKENIZER


def test_every_scan_parameter_lands_in_its_group_for_both_directions():
    assert grad_group("layers.0.mixer.x_proj_b.weight") == grad_group("layers.0.mixer.x_proj.weight") == "x_proj"
    assert grad_group("layers.1.mixer.A_b_log") == grad_group("layers.1.mixer.A_log") == "A_log"
    assert grad_group("layers.1.mixer.dt_proj_b.bias") == "dt_proj"
    assert grad_group("layers.0.norm.weight") == "norm"


def test_reversed_clips_change_the_mamba_average_and_every_group_gets_gradient():
    model, _ = build_model(str(ROOT / "conf/sft.yaml"))
    model.eval()
    row = measure(model, clips("direction", 2, 8, model.vision.image_size, seed=0))
    assert 0 < row["projector / tokens"] < 1
    assert 0 < row["reversal / spread"] < 1  # random weights: some order, far less than content
    for group in GRAD_GROUPS:
        assert math.isfinite(row[f"grad {group}"]) and row[f"grad {group}"] > 0, group
    assert all(p.grad is None for p in model.parameters())  # leaves the model as it found it


@pytest.mark.parametrize("seed", range(3))
def test_position_question_answers_the_quadrant_the_shape_is_in(seed):
    from storm_lightning.tokenizer import load_tokenizer

    sample = task_learnability.position_sample(np.random.default_rng(seed), load_tokenizer(TOKENIZER), 64)
    lit = sample.pixel_values[0].amax(0) > 60  # (64, 64): the shape on the dark background
    ys, xs = lit.nonzero(as_tuple=True)
    quadrant = f"{'top' if ys.float().mean() < 32 else 'bottom'} {'left' if xs.float().mean() < 32 else 'right'}"
    assert sample.options[sample.answer] == quadrant


def test_learnability_run_prints_held_out_accuracy_per_category(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["task_learnability.py", "--config", str(ROOT / "conf/sft.yaml"),
                                      "--tasks", "direction", "count", "--images", "1", "--batch", "2",
                                      "--frames", "4", "--steps", "2", "--eval-every", "1", "--eval-clips", "6",
                                      "--images-first", "1"])
    task_learnability.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2"]
    assert all("image_position=" in line and "direction=" in line and "count=" in line for line in lines)
