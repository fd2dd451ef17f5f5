"""Vision backbones, downsampler, compressors and LLM: shapes, local checkpoints, misconfigurations."""

import pytest
import torch

from storm_lightning.compressors import SpatialAveragePool, TemporalAveragePool, TemporalSample, chain_output_shape
from storm_lightning.downsamplers import PixelShuffleDownsampler
from storm_lightning.llm import HFCausalLM
from storm_lightning.vision import SiglipVisionBackbone, TimmViTBackbone

# ---- vision ---------------------------------------------------------------------------------------------


def test_siglip_outputs_patch_tokens_only():
    vision = SiglipVisionBackbone(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=64)
    out = vision(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 16, 32) and vision.grid == (4, 4)
    with pytest.raises(AssertionError, match=r"expects \(F, 3, 32, 32\)"):
        vision(torch.randn(5, 3, 64, 64))


def test_siglip_penultimate_layer():
    vision = SiglipVisionBackbone(image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2,
                                  intermediate_size=32, select_layer=-2)
    assert vision(torch.randn(2, 3, 16, 16)).shape == (2, 4, 16)


def test_siglip_from_local_directory(tmp_path):
    built = SiglipVisionBackbone(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                 intermediate_size=64)
    built.model.save_pretrained(tmp_path / "siglip")
    loaded = SiglipVisionBackbone(pretrained_path=str(tmp_path / "siglip"))
    assert (loaded.image_size, loaded.patch_size, loaded.hidden_size) == (32, 8, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), built(x))
    with pytest.raises(FileNotFoundError, match="model.vision.init_args.pretrained_path"):
        SiglipVisionBackbone(pretrained_path=str(tmp_path / "nowhere"))


def test_timm_vit_drops_prefix_tokens_and_loads_local_checkpoint(tmp_path):
    vit = TimmViTBackbone("vit_tiny_patch16_224", image_size=32, patch_size=8)
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16, vit.hidden_size)
    torch.save(vit.model.state_dict(), tmp_path / "vit.pth")
    loaded = TimmViTBackbone("vit_tiny_patch16_224", image_size=32, patch_size=8,
                             checkpoint_path=str(tmp_path / "vit.pth"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vit(x))
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        TimmViTBackbone(checkpoint_path=str(tmp_path / "missing.pth"))


# ---- downsampler ----------------------------------------------------------------------------------------


def test_pixel_shuffle_groups_neighbouring_patches():
    down = PixelShuffleDownsampler(input_dim=1, output_dim=4, ratio=2)
    with torch.no_grad():
        down.proj.weight.copy_(torch.eye(4))
        down.proj.bias.zero_()
    # a 4x4 grid whose patch value is its index: token 0 must hold patches 0, 1, 4, 5
    x = torch.arange(16.0).view(1, 16, 1)
    out = down(x, (4, 4))
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 3].tolist() == [10, 11, 14, 15]


def test_paper_shape_1024_patches_to_256_tokens():
    down = PixelShuffleDownsampler(input_dim=8, output_dim=6, ratio=2)
    assert down(torch.randn(2, 1024, 8), (32, 32)).shape == (2, 256, 6)
    assert down.output_grid((32, 32)) == (16, 16)
    with pytest.raises(ValueError, match="ratio=2 must divide"):
        PixelShuffleDownsampler(input_dim=8, output_dim=6, ratio=2, pad_odd_grid=False).output_grid((5, 5))


def test_an_odd_grid_is_padded_with_zero_tokens_below_and_right():
    """SigLIP so400m-384's 27 x 27 patches -> 28 x 28 -> 14 x 14 = 196 tokens; the last token of each
    row and column sees one real patch column/row and zeros."""
    down = PixelShuffleDownsampler(input_dim=1, output_dim=4, ratio=2)
    with torch.no_grad():
        down.proj.weight.copy_(torch.eye(4))
        down.proj.bias.zero_()
    assert down.output_grid((27, 27)) == (14, 14)
    assert down(torch.randn(1, 729, 1), (27, 27)).shape == (1, 196, 4)
    x = torch.arange(1.0, 10.0).view(1, 9, 1)  # a 3x3 grid of 1..9
    out = down(x, (3, 3))
    assert out[0].tolist() == [[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]


# ---- compressors ----------------------------------------------------------------------------------------


def test_temporal_average_pool_with_remainder():
    x = torch.arange(10.0).view(1, 10, 1, 1).expand(1, 10, 4, 2)
    out, grid = TemporalAveragePool(4)(x, (2, 2))
    assert out.shape == (1, 3, 4, 2) and grid == (2, 2)
    assert out[0, :, 0, 0].tolist() == [1.5, 5.5, 8.5]  # last group: mean of frames 8 and 9
    assert TemporalAveragePool(4).output_shape(10, (2, 2), True) == (3, (2, 2))


def test_spatial_average_pool_256_to_64():
    x = torch.randn(2, 3, 256, 5)
    out, grid = SpatialAveragePool(2)(x, (16, 16))
    assert out.shape == (2, 3, 64, 5) and grid == (8, 8)
    torch.testing.assert_close(out[0, 0, 0], x[0, 0, [0, 1, 16, 17]].mean(0))
    with pytest.raises(ValueError, match="kernel_size=3 must divide"):
        SpatialAveragePool(3).output_shape(1, (16, 16), True)


def test_temporal_sample_is_test_time_only_by_default():
    x = torch.randn(1, 8, 4, 2)
    sample = TemporalSample(4)
    sample.train()
    assert sample(x, (2, 2))[0].shape[1] == 8
    sample.eval()
    out, _ = sample(x, (2, 2))
    torch.testing.assert_close(out, x[:, [0, 4]])
    always = TemporalSample(4, in_training=True).train()
    assert always(x, (2, 2))[0].shape[1] == 2


def test_chain_output_shape():
    chain = [TemporalAveragePool(4), SpatialAveragePool(2), TemporalSample(2)]
    assert chain_output_shape(chain, 128, (16, 16), training=True) == (32, (8, 8))
    assert chain_output_shape(chain, 128, (16, 16), training=False) == (16, (8, 8))
    assert chain_output_shape(chain, 1, (16, 16), training=False) == (1, (8, 8))  # an image


# ---- LLM ------------------------------------------------------------------------------------------------


def test_llm_from_config_and_from_local_directory(tmp_path):
    llm = HFCausalLM(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=50)
    assert llm.hidden_size == 32 and llm.vocab_size == 50 and len(llm.shard_units()) == 1
    ids, attention = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    head_mask = torch.tensor([[True, False, True, False]])
    hidden, logits = llm(ids, attention, head_mask=head_mask)
    assert hidden.shape == (1, 4, 32) and logits.shape == (2, 50)
    llm.model.save_pretrained(tmp_path / "qwen")
    loaded = HFCausalLM(pretrained_path=str(tmp_path / "qwen"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention, head_mask=head_mask)[1], logits)


def test_llm_writes_visual_tokens_into_their_slots():
    llm = HFCausalLM(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=20)
    ids = torch.tensor([[1, 0, 0, 2], [3, 4, 0, 5]])
    slots = torch.tensor([[False, True, True, False], [False, False, True, False]])
    visual = torch.randn(3, 8)
    embeds = llm.embed_with_visual(ids, slots, visual)
    torch.testing.assert_close(embeds[0, 1:3], visual[:2])
    torch.testing.assert_close(embeds[1, 2], visual[2])
    torch.testing.assert_close(embeds[1, 0], llm.embed(torch.tensor([3]))[0])


def test_llm_misconfigurations():
    with pytest.raises(ValueError, match="hidden_size=30 must be divisible by num_heads=4"):
        HFCausalLM(hidden_size=30, num_heads=4, num_kv_heads=2)
    with pytest.raises(FileNotFoundError, match="model.llm.init_args.pretrained_path"):
        HFCausalLM(pretrained_path="/nonexistent/qwen")


@pytest.mark.parametrize("config", ["conf/paper/sft_32f.yaml", "conf/paper/long_128f.yaml"])
def test_paper_configs_build_with_the_paper_shapes(config):
    """Built on the meta device: the sizes are checked without allocating 8B parameters."""
    from storm_lightning.inference import build_model
    from tests.conftest import ROOT

    with torch.device("meta"):
        model, data = build_model(str(ROOT / config))
    assert model.vision.num_patches == 1024 and model.token_grid == (16, 16)
    frames = data["train_sources"][0]["frames_per_clip"]
    assert model.visual_tokens(frames, training=True)[1] == 8192  # the paper's 8K visual-token budget
    params = sum(p.numel() for p in model.llm.parameters())
    assert 7.0e9 < params < 8.0e9  # Qwen2-7B
