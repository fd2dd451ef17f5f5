"""Checkpoints as published, from local save_pretrained directories the tests make: SigLIP towers at
384/patch 14 (27 x 27), 448/patch 14 (32 x 32), 224, whole SigLIP models, SigLIP2 NaFlex; causal LMs."""

import pytest
import torch

from storm_lightning.downsamplers import PixelShuffleDownsampler
from storm_lightning.errors import ConfigError, UserError
from storm_lightning.vision import SiglipVisionBackbone
from tests.conftest import FAST, storm_fit

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)


def siglip_tower(path, image_size, patch_size=14, whole=False):
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vision = SiglipVisionConfig(image_size=image_size, patch_size=patch_size, **TINY)
    if whole:  # the layout google/siglip-so400m-patch14-384 ships: text and vision towers
        model = SiglipModel(SiglipConfig(text_config=dict(vocab_size=100, **TINY), vision_config=vision.to_dict()))
    else:
        model = SiglipVisionModel(vision)
    model.save_pretrained(path)
    return model.eval()


def pixels(size, frames=2):
    return torch.rand(frames, 3, size, size) * 2 - 1


@pytest.mark.parametrize("image_size, grid, tokens", [(384, 27, 196), (448, 32, 256), (224, 16, 64)])
def test_published_layouts_load_and_pixel_shuffle_2(tmp_path, image_size, grid, tokens):
    original = siglip_tower(tmp_path / "tower", image_size)
    tower = SiglipVisionBackbone(pretrained_path=str(tmp_path / "tower")).eval()
    assert (tower.image_size, tower.patch_size, tower.hidden_size, tower.grid) == (image_size, 14, 32, (grid, grid))
    x = pixels(image_size)
    with torch.no_grad():
        out = tower(x)
        torch.testing.assert_close(out, original(pixel_values=x).last_hidden_state)  # the checkpoint's weights
    down = PixelShuffleDownsampler(32, 8, ratio=2)
    assert down(out, tower.grid).shape == (2, tokens, 8)  # 27 x 27 is padded to 28 x 28


def test_a_whole_siglip_model_gives_its_vision_tower(tmp_path):
    whole = siglip_tower(tmp_path / "whole", 384, whole=True)
    tower = SiglipVisionBackbone(pretrained_path=str(tmp_path / "whole")).eval()
    x = pixels(384, frames=1)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), whole.vision_model(pixel_values=x).last_hidden_state)


def test_another_image_size_interpolates_the_position_embeddings(tmp_path, caplog):
    original = siglip_tower(tmp_path / "tower", 384)
    with caplog.at_level("INFO"):
        tower = SiglipVisionBackbone(pretrained_path=str(tmp_path / "tower"), image_size=448).eval()
    assert tower.grid == (32, 32) and "interpolated from its 384 px" in caplog.text
    x = pixels(448, frames=1)
    with torch.no_grad():
        expected = original(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(tower(x), expected)


def test_siglip2_naflex_takes_patches_in_its_processors_order(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    torch.manual_seed(0)
    original = Siglip2VisionModel(Siglip2VisionConfig(num_patches=64, patch_size=16, **TINY)).eval()
    original.save_pretrained(tmp_path / "siglip2")
    tower = SiglipVisionBackbone(pretrained_path=str(tmp_path / "siglip2"), image_size=192).eval()
    assert tower.siglip2 and tower.grid == (12, 12)  # native 8 x 8 (128 px), run at 12 x 12
    x = pixels(192, frames=1)
    patches = convert_image_to_patches(x[0], 16)[None]
    with torch.no_grad():
        expected = original(pixel_values=patches, pixel_attention_mask=torch.ones(1, 144, dtype=torch.long),
                            spatial_shapes=torch.tensor([[12, 12]])).last_hidden_state
        torch.testing.assert_close(tower(x), expected)


def test_a_size_that_contradicts_the_checkpoint_fails_naming_the_key(tmp_path):
    siglip_tower(tmp_path / "tower", 384)
    with pytest.raises(ConfigError, match=r"model.vision.init_args.hidden_size=1152 contradicts the checkpoint .* "
                                          r"\(hidden_size=32\)"):
        SiglipVisionBackbone(pretrained_path=str(tmp_path / "tower"), hidden_size=1152)
    with pytest.raises(ConfigError, match="image_size=10 must be at least patch_size=14"):
        SiglipVisionBackbone(pretrained_path=str(tmp_path / "tower"), image_size=10)
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm/config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(ConfigError, match="holds a 'qwen2' model, not a SigLIP"):
        SiglipVisionBackbone(pretrained_path=str(tmp_path / "llm"))


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [384, 448])
def test_storm_fit_trains_and_tests_from_a_published_layout(run_dir, tmp_path, image_size):
    siglip_tower(tmp_path / "tower", image_size)
    (run_dir / "tower.yaml").write_text(f"""\
model:
  vision:
    class_path: storm_lightning.vision.SiglipVisionBackbone
    init_args: {{pretrained_path: {tmp_path / 'tower'}, image_size: null, patch_size: null, hidden_size: null,
                num_layers: null, num_heads: null, intermediate_size: null, select_layer: -2}}
  downsampler:
    init_args: {{input_dim: 32, ratio: 2}}
data:
  image_size: {image_size}
  batch_size: 2
  train_sources:
    - {{name: image, shards: "data_shards/train/image-000000.tar"}}
    - {{name: video, shards: "data_shards/train/video32-000000.tar", frames_per_clip: 2}}
  val_sources:
    - {{name: image, shards: "data_shards/eval/image-000000.tar"}}
""")
    storm_fit("--config", "conf/sft.yaml", "--config", "tower.yaml", *FAST)
    ckpt = run_dir / "runs/sft/checkpoints/last.ckpt"
    proc = storm_fit("test", "--config", "conf/sft.yaml", "--config", "tower.yaml", f"--ckpt_path={ckpt}",
                     "--trainer.limit_test_batches=4", "--data.num_workers=0", "--trainer.enable_progress_bar=false")
    output = proc.stdout + proc.stderr
    assert "test/accuracy/overall" in output  # the multiple-choice image questions, scored
    assert f"{(-(-image_size // 14 // 2)) ** 2}.0" in output  # test/visual_tokens_after: 196 or 256 a frame


def test_an_llm_loads_with_its_own_sizes_and_contradictions_fail(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from storm_lightning.llm import HFCausalLM

    Qwen2ForCausalLM(Qwen2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=300)).save_pretrained(tmp_path / "qwen2")
    llm = HFCausalLM(pretrained_path=str(tmp_path / "qwen2"), hidden_size=48, model_type="qwen2")
    assert (llm.hidden_size, llm.vocab_size) == (48, 300)
    with pytest.raises(ConfigError, match=r"model.llm.init_args.num_layers=28 contradicts the checkpoint .*"
                                          r"\(num_layers=1\)"):
        HFCausalLM(pretrained_path=str(tmp_path / "qwen2"), num_layers=28)


def test_sharded_load_on_one_device_reads_what_from_pretrained_reads(tmp_path, caplog):
    """``sharded_load`` (conf/fsdp.yaml) without FSDP2: built on meta, read by configure_model, equal to
    transformers' own loading; with LoRA the weights are read at build (peft wraps real weights); a
    checkpoint without safetensors is one line naming the key."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from storm_lightning.llm import HFCausalLM
    from storm_lightning.lora import LoraSettings, plain_key
    from tests.test_model import make_batch, tiny

    qwen2 = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, vocab_size=620,
                                         tie_word_embeddings=True))
    qwen2.save_pretrained(tmp_path / "qwen2")
    path = str(tmp_path / "qwen2")
    eager = tiny(llm=HFCausalLM(pretrained_path=path))
    lazy = tiny(llm=HFCausalLM(pretrained_path=path, sharded_load=True))
    assert all(p.is_meta for p in lazy.llm.parameters())
    lazy.configure_model()  # what Lightning calls, sharded or not
    assert lazy.llm.weights_pending is None and lazy.llm.model.lm_head.weight is lazy.llm.model.model.embed_tokens.weight
    for name, value in eager.llm.state_dict().items():
        torch.testing.assert_close(lazy.llm.state_dict()[name], value, rtol=0, atol=0, msg=name)
    batch = make_batch(eager)
    lazy.load_state_dict({k: v for k, v in eager.state_dict().items() if not k.startswith("llm.")}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(lazy.eval()(batch)["loss"], eager.eval()(batch)["loss"])

    adapted = tiny(llm=HFCausalLM(pretrained_path=path, sharded_load=True), lora_llm=LoraSettings(rank=2))
    theirs = {plain_key(k): v for k, v in adapted.llm.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(theirs[k], v) for k, v in eager.llm.state_dict().items())

    # in the stored dtype where config.json names none, as transformers' own loading
    import json

    qwen2.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16/config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "bf16/config.json").write_text(json.dumps(config))
    assert HFCausalLM(pretrained_path=str(tmp_path / "bf16"), sharded_load=True).model.dtype == torch.bfloat16
    assert HFCausalLM(pretrained_path=str(tmp_path / "bf16")).model.dtype == torch.bfloat16

    # what cannot be read rank by rank is read whole, with a warning: an older layout (pytorch_model.bin),
    # names transformers converts while loading (here: one renamed), a shape other than the model's
    from safetensors.torch import load_file, save_file

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/config.json").write_bytes((tmp_path / "qwen2/config.json").read_bytes())
    torch.save(qwen2.state_dict(), tmp_path / "bin/pytorch_model.bin")
    tensors = load_file(tmp_path / "qwen2/model.safetensors")
    renamed = dict(tensors, renamed=tensors["model.norm.weight"])
    del renamed["model.norm.weight"]
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    for folder, changed in (("renamed", renamed), ("shape", dict(tensors, **{k_proj: tensors[k_proj][:8]}))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_bytes((tmp_path / "qwen2/config.json").read_bytes())
        save_file(changed, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
    for folder, reason in (("bin", "it holds no safetensors"), ("renamed", "no tensor 'model.norm.weight'")):
        with caplog.at_level("WARNING", logger="storm_lightning.llm"):
            llm = HFCausalLM(pretrained_path=str(tmp_path / folder), sharded_load=True)
        assert llm.weights_pending is None and reason in caplog.text and "every rank reads all of it" in caplog.text
    assert all(torch.equal(llm.state_dict()[k], v) for k, v in eager.llm.state_dict().items() if "norm" not in k)
    with caplog.at_level("WARNING", logger="storm_lightning.llm"), pytest.raises(
            UserError, match=r"^model.llm.init_args.pretrained_path: .*shape does not load \(RuntimeError: "):
        HFCausalLM(pretrained_path=str(tmp_path / "shape"), sharded_load=True)  # transformers: a size mismatch
    assert "is (8, 32) in the checkpoint, (16, 32) in the model" in caplog.text
    # a config that ties the head while the file stores a head of its own: transformers unties them, so
    # must a rank-by-rank read (it tied them silently: another model)
    head = dict(tensors, **{"lm_head.weight": torch.randn(620, 32)})
    (tmp_path / "head").mkdir()
    (tmp_path / "head/config.json").write_bytes((tmp_path / "qwen2/config.json").read_bytes())
    save_file(head, tmp_path / "head/model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="storm_lightning.llm"):
        assert HFCausalLM(pretrained_path=str(tmp_path / "head"), sharded_load=True).weights_pending is None
    assert "['lm_head.weight'] stored apart from the weight the config ties them to" in caplog.text
    # an embedding with fewer rows than the config's vocab_size: refused as transformers refuses it (it was
    # accepted, the missing rows drawn at random, and trained on)
    config = json.loads((tmp_path / "qwen2/config.json").read_text())
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab/config.json").write_text(json.dumps(dict(config, vocab_size=700)))
    (tmp_path / "vocab/model.safetensors").write_bytes((tmp_path / "qwen2/model.safetensors").read_bytes())
    with caplog.at_level("WARNING", logger="storm_lightning.llm"), pytest.raises(UserError, match="does not load"):
        HFCausalLM(pretrained_path=str(tmp_path / "vocab"), sharded_load=True)
    assert "'model.embed_tokens.weight' is (620, 32) in the checkpoint, (700, 32) in the model" in caplog.text


def test_an_export_needs_no_original_checkpoint_directory(tmp_path):
    """A model built from a SigLIP tower and an LLM in local directories: storm-export writes their
    configs beside the weights, and the export loads with both directories gone, weights equal."""
    import shutil

    import yaml
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from storm_lightning.inference import build_model, export, from_pretrained
    from tests.conftest import ROOT

    siglip_tower(tmp_path / "tower", 384, whole=True)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=1024)).save_pretrained(tmp_path / "qwen2")
    config = yaml.safe_load((ROOT / "conf/sft.yaml").read_text())
    config["model"]["vision"]["init_args"] = {"pretrained_path": str(tmp_path / "tower")}
    config["model"]["downsampler"]["init_args"]["input_dim"] = 32
    config["model"]["llm"]["init_args"] = {"pretrained_path": str(tmp_path / "qwen2")}
    config["data"]["tokenizer_path"] = str(ROOT / "data_shards/tokenizer")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    model, _ = build_model(str(tmp_path / "run.yaml"))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "last.ckpt")

    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "export"), str(tmp_path / "run.yaml"))
    shutil.rmtree(tmp_path / "tower")
    shutil.rmtree(tmp_path / "qwen2")
    assert (out / "vision/config.json").is_file() and (out / "llm/config.json").is_file()
    loaded = from_pretrained(str(out))
    assert loaded.vision.grid == (27, 27) and loaded.llm.model.config.num_hidden_layers == 1
    theirs = loaded.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())
    # an export naming a directory outside itself is refused (its weights would be read from there)
    import json

    meta = json.loads((out / "config.json").read_text())
    meta["model"]["llm"]["init_args"]["pretrained_path"] = str(tmp_path)
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"model.llm.init_args.pretrained_path must be a folder inside the export"):
        from_pretrained(str(out))
