"""StormModel: splicing visual tokens, loss masking, checks at build time, freezing, schedules, init_from."""

from types import SimpleNamespace

import pytest
import torch

from storm_lightning.compressors import SpatialAveragePool, TemporalAveragePool, TemporalSample
from storm_lightning.data import ShardSource, StormDataModule
from storm_lightning.data.batching import collate
from storm_lightning.data.samples import Sample
from storm_lightning.downsamplers import PixelShuffleDownsampler
from storm_lightning.errors import ConfigError
from storm_lightning.evaluation import choice_scores
from storm_lightning.llm import HFCausalLM
from storm_lightning.model import StormModel
from storm_lightning.projectors import MambaTemporalProjector, MLPProjector
from storm_lightning.tokenizer import IGNORE_INDEX, encode_conversation
from storm_lightning.vision import SiglipVisionBackbone
from tests.conftest import SHARDS, TOKENIZER


def tiny(projector="mamba", compressors=None, vision_dim=16, proj_out=32, llm_dim=32, image_size=32, llm=None,
         **kwargs):
    vision = SiglipVisionBackbone(image_size=image_size, patch_size=8, hidden_size=vision_dim, num_layers=1,
                                  num_heads=2, intermediate_size=32)
    down = PixelShuffleDownsampler(input_dim=16, output_dim=32, ratio=2)
    proj = (MambaTemporalProjector(32, proj_out, num_layers=1, d_state=4) if projector == "mamba"
            else MLPProjector(32, proj_out))
    llm = llm or HFCausalLM(hidden_size=llm_dim, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                            vocab_size=600)
    return StormModel(vision, down, proj, llm, compressors=compressors, tokenizer_path=TOKENIZER, **kwargs)


def make_batch(model, frames=(4, 1, 0)):
    """One sample per entry of ``frames``: a T-frame video, an image (1), or text only (0)."""
    tok = model.tokenizer
    rows, pixel_values = [], []
    for t in frames:
        tag = "<video>\n" if t > 1 else "<image>\n" if t == 1 else ""
        ids, labels = encode_conversation(tok, [{"from": "human", "value": f"{tag}What happens?"},
                                                {"from": "gpt", "value": "a red circle moves left."}], 512)
        rows.append((torch.tensor(ids), torch.tensor(labels)))
        pixel_values.append(torch.randint(0, 255, (t, 3, 32, 32), dtype=torch.uint8) if t else None)
    return collate([Sample(key=f"s{i}", source="test", input_ids=ids, labels=lab, pixel_values=pixels)
                    for i, ((ids, lab), pixels) in enumerate(zip(rows, pixel_values))], pad_id=0)


def test_visual_tokens_replace_placeholders():
    model = tiny(compressors=[TemporalAveragePool(2)])
    batch = make_batch(model, frames=(4, 1, 0))
    inputs, attention, labels = model.build_inputs(batch)
    text_lengths = batch.attention_mask.sum(1)
    # 4x4 patches -> 2x2 tokens per frame; 4 frames pooled by 2 -> 2 frames -> 8 tokens; an image -> 4
    assert attention.sum(1).tolist() == [text_lengths[0] - 1 + 8, text_lengths[1] - 1 + 4, text_lengths[2]]
    assert inputs.shape == (3, int(attention.sum(1).max()), 32)
    # visual tokens never carry a label; assistant tokens keep theirs
    assert (labels != IGNORE_INDEX).sum() == (batch.labels != IGNORE_INDEX).sum()


def test_forward_loss_and_backward_through_every_component():
    model = tiny(compressors=[SpatialAveragePool(2), TemporalSample(2)])
    out = model(make_batch(model))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name in ("vision", "downsampler", "projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_loss_falls_on_a_fixed_batch():
    model = tiny(lr_projector=3e-3, lr_llm=3e-3, lr_vision=1e-3)
    batch = make_batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_loss_weighting_averages_tokens_samples_or_square_roots():
    model = tiny()
    batch = make_batch(model, frames=(4, 1, 0))
    # sample 0 keeps only its last two targets (like a letter + <|im_end|>), the others keep all of theirs
    answer = (batch.labels[0] != IGNORE_INDEX).nonzero().flatten()
    batch.labels[0, answer[:-2]] = IGNORE_INDEX
    counts = (batch.labels != IGNORE_INDEX).sum(1).float()
    assert counts[0] == 2 and counts[1] > 5
    losses = {}
    with torch.no_grad():
        for weighting in ("token", "sample", "square"):
            model.hparams.loss_weighting = weighting
            out = model(batch)
            losses[weighting] = out["loss"]
    per_sample = out["sample_loss"]
    for weighting, weight in (("token", counts), ("sample", torch.ones(3)), ("square", counts.sqrt())):
        expected = (per_sample * weight).sum() / weight.sum()
        torch.testing.assert_close(losses[weighting], expected, msg=weighting)
    assert len({round(float(v), 5) for v in losses.values()}) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_weighting="mean"), r"model.loss_weighting: expected token, sample or square, got 'mean'"),
    (dict(proj_out=24), r"model.projector.init_args.output_dim=24 must equal the LLM hidden size 32"),
    (dict(vision_dim=24), r"model.downsampler.init_args.input_dim=16 must equal the vision width 24"),
    (dict(compressors=[SpatialAveragePool(4)]),
     r"model.compressors\[0\] \(SpatialAveragePool\): .*kernel_size=4 must divide the 2x2 token grid"),
    (dict(image_size=40, compressors=[SpatialAveragePool(2)]),  # 5x5 patches, padded to 6x6 -> 3x3 tokens
     r"model.compressors\[0\] \(SpatialAveragePool\): .*kernel_size=2 must divide the 3x3 token grid"),
    (dict(init_from="/nonexistent.ckpt"), r"model.init_from: no such checkpoint"),
])
def test_misconfigurations_fail_at_build_naming_the_key(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        tiny(**kwargs)


def fake_trainer(model, datamodule):
    model._trainer = SimpleNamespace(datamodule=datamodule)


def test_setup_checks_data_against_the_model():
    dm = StormDataModule([ShardSource("v", str(SHARDS / "train/video32-000000.tar"), frames_per_clip=2)],
                         tokenizer_path=TOKENIZER, image_size=32)
    model = tiny(compressors=[TemporalAveragePool(4)])
    fake_trainer(model, dm)
    with pytest.raises(ValueError, match=r"data.train_sources\[0\].frames_per_clip=2 is fewer frames than"):
        model.setup("fit")
    dm.image_size = 64
    model = tiny()
    fake_trainer(model, dm)
    with pytest.raises(ValueError, match="data.image_size=64 must equal the vision backbone's image size 32"):
        model.setup("fit")


def test_freeze_flags_and_learning_rates():
    model = tiny(freeze_vision=True, freeze_llm=True, lr_projector=1e-3)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    model._trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = model.configure_optimizers()
    names = {g["name"] for g in config["optimizer"].param_groups}
    assert names == {"projector", "projector_no_decay"}
    assert all(g["lr"] == pytest.approx(1e-3 / model.hparams.warmup_steps) for g in config["optimizer"].param_groups)


def test_warmup_then_cosine_schedule():
    model = tiny(warmup_steps=10, min_lr_ratio=0.1, lr_projector=1.0, lr_llm=1.0, lr_vision=1.0)
    model._trainer = SimpleNamespace(estimated_stepping_batches=110)
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55, abs=0.02) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_init_from_a_previous_stage(tmp_path):
    first = tiny()
    torch.save({"state_dict": first.state_dict()}, tmp_path / "stage.ckpt")
    second = tiny(init_from=str(tmp_path / "stage.ckpt"), compressors=[TemporalAveragePool(2)])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ConfigError, match="does not fit this model"):
        tiny(projector="mlp", init_from=str(tmp_path / "stage.ckpt"))


def fit_tiny(model, steps, callbacks=()):
    import lightning as L

    dm = StormDataModule([ShardSource("image", str(SHARDS / "train/image-000000.tar"))], tokenizer_path=TOKENIZER,
                         image_size=32, batch_size=2, num_workers=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, dm)
    return trainer


class PoisonLoss:
    """Makes the model's loss NaN on the given steps (a Lightning callback-like patch)."""

    def __init__(self, model, steps):
        self.steps, forward = set(steps), model.forward

        def poisoned(batch):
            out = forward(batch)
            if model.global_step in self.steps:
                out["loss"] = out["loss"] * float("nan")
            return out

        model.forward = poisoned


def test_nonfinite_loss_steps_are_skipped_and_counted():
    model = tiny(max_nonfinite_steps=3)
    PoisonLoss(model, steps={2})
    fit_tiny(model, steps=5)
    assert model._nonfinite_total >= 1 and model._nonfinite_streak == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights


def test_nonfinite_loss_in_a_row_stops_the_run():
    model = tiny(max_nonfinite_steps=3)
    PoisonLoss(model, steps=range(1, 100))
    with pytest.raises(RuntimeError, match=r"NaN/inf for 3 steps in a row.*model.max_nonfinite_steps=3"):
        fit_tiny(model, steps=10)


def test_the_model_counts_visual_tokens_after_compression_for_the_data_module():
    import pickle

    model = tiny(compressors=[TemporalAveragePool(4), TemporalSample(2)])  # 2 x 2 tokens per frame
    count = pickle.loads(pickle.dumps(model.visual_token_count))  # what data workers receive
    assert [count(1), count(8), count(6)] == [4, 8, 8]  # sampling is off in training


def test_choice_scores_read_the_position_that_predicts_the_answer_letter():
    """Give the LM head a perfect oracle (logit 1 on each position's true next token): the option
    scores must then pick the right letter, for each sample, in whatever turn the answer is."""
    import torch.nn.functional as F

    model = tiny()
    tok = model.tokenizer
    rows = []
    for answer in ("C", "A", "D"):
        turns = [{"from": "human", "value": "What is 1 plus 1?"}, {"from": "gpt", "value": "2."},
                 {"from": "human", "value": "Pick one.\nA. x\nB. y\nC. z\nD. w"}, {"from": "gpt", "value": answer}]
        ids, labels = encode_conversation(tok, turns, 512)
        rows.append((torch.tensor(ids), torch.tensor(labels)))
    length = max(len(r[0]) for r in rows)
    labels = torch.full((3, length), IGNORE_INDEX)
    for i, (_, lab) in enumerate(rows):
        labels[i, : len(lab)] = lab
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    oracle = F.one_hot(targets[keep], num_classes=len(tok)).float()
    scores = choice_scores(oracle, keep, model.option_token_ids)
    assert scores[:, :4].argmax(1).tolist() == [2, 0, 3]


def test_packed_batches_give_the_padded_loss_and_option_scores():
    """One sequence of the samples' real tokens, attention within each sample, == rows padded to the longest."""
    from storm_lightning.llm import PACKED_ATTENTION

    torch.manual_seed(0)
    model = tiny(compressors=[TemporalAveragePool(2)]).eval()
    assert model.llm.model.config._attn_implementation == PACKED_ATTENTION
    batch = make_batch(model, frames=(8, 1, 0, 4, 1))  # rows of very different lengths
    model.hparams.pack_sequences = False
    padded = model(batch)
    model.hparams.pack_sequences = True
    packed = model(batch)
    for key in ("loss", "sample_loss", "choice_scores"):
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-5, atol=1e-5, msg=key)
    assert packed["llm_tokens"] == padded["llm_tokens"]
    padded_grads = torch.autograd.grad(padded["loss"], list(model.projector.parameters()), allow_unused=True)
    packed_grads = torch.autograd.grad(packed["loss"], list(model.projector.parameters()), allow_unused=True)
    for a, b in zip(padded_grads, packed_grads):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_packed_sequence_does_not_attend_across_samples():
    """Changing one sample's tokens leaves the other samples' logits as they were."""
    from storm_lightning.model import pack

    model = tiny().eval()
    batch = make_batch(model, frames=(0, 0, 0))
    x = model.expand_inputs(batch)
    head = torch.ones_like(x["attention_mask"], dtype=torch.bool) & x["attention_mask"].bool()
    with torch.no_grad():
        _, before = model.llm(**pack(x, head))
        x["input_ids"][0, :3] = 7  # the first sample only
        _, after = model.llm(**pack(x, head))
    first = int(x["attention_mask"][0].sum())
    assert not torch.allclose(before[:first], after[:first])
    torch.testing.assert_close(after[first:], before[first:])
