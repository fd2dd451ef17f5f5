"""benchmarks/probe_tokens.py: the probe reads a linear rule and not noise, and the order-free average it
probes forgets time order at the vision tower but not after the Mamba projector."""

import torch

from benchmarks.probe_tokens import features, probe
from storm_lightning.inference import build_model
from tests.conftest import ROOT, TOKENIZER


def test_probe_reads_a_linear_rule_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    rule = (x[:, 3] > 0).long()
    noise = torch.randint(0, 2, (400,), generator=g)
    assert probe(x[:300], rule[:300], x[300:], rule[300:], classes=2) > 0.9
    assert probe(x[:300], noise[:300], x[300:], noise[300:], classes=2) < 0.7


def test_the_vision_average_forgets_time_order_and_the_projector_average_keeps_it():
    model, _ = build_model(str(ROOT / "conf/sft.yaml"))
    model.eval()
    clip = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    averages = {}
    with torch.no_grad():
        for name, frames in (("forward", clip), ("reversed", clip.flip(0))):
            x = (frames.float() / 255.0 - model.pixel_mean) / model.pixel_std
            visual, _ = model.encode_media(frames, torch.tensor([len(frames)]))
            averages[name] = (model.vision(x).mean((0, 1)), visual[0].mean(0))
    (vision_fwd, llm_fwd), (vision_rev, llm_rev) = averages["forward"], averages["reversed"]
    torch.testing.assert_close(vision_fwd, vision_rev)
    assert (llm_fwd - llm_rev).abs().max() > 1e-3


def test_features_groups_the_multiple_choice_samples_by_category():
    model, _ = build_model(str(ROOT / "conf/sft.yaml"))
    model.eval()
    rows = features(model, [f"image={ROOT}/data_shards/eval/image-000000.tar"], 32, TOKENIZER, limit=5)
    assert set(rows) == {"image_color", "image_shape", "image_position"}
    for category, row in rows.items():
        assert row["labels"].shape == (5,)
        assert row["vision"].shape == (5, model.vision.hidden_size)
        assert row["llm_input"].shape == (5, model.llm.hidden_size)
    assert rows["image_shape"]["options"] == rows["image_position"]["options"] == 4
    assert rows["image_color"]["options"] == 8
