import pytest
import torch
import torch.nn.functional as F

from tpr_ray.methods.backbone import BackboneConfig, build_clip, get_tokenizer
from tpr_ray.errors import ConfigError


def test_tiny_model_at_384x128_has_24x8_grid():
    model = build_clip(BackboneConfig("tpr-tiny", None))
    assert tuple(model.visual.grid_size) == (24, 8)
    assert model.visual.positional_embedding.shape[0] == 24 * 8 + 1
    out = model.encode_image(torch.randn(2, 3, 384, 128))
    assert out.shape == (2, 64)


def test_local_checkpoint_is_loaded_and_square_pos_embed_interpolated(tmp_path):
    square = build_clip(BackboneConfig("tpr-tiny", None, (224, 224)))
    assert square.visual.positional_embedding.shape[0] == 14 * 14 + 1
    path = tmp_path / "tiny224.pt"
    torch.save(square.state_dict(), path)

    model = build_clip(BackboneConfig("tpr-tiny", str(path), (384, 128)))
    old = square.visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(24, 8), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([old[:1], expected.permute(0, 2, 3, 1).reshape(24 * 8, -1)])
    torch.testing.assert_close(model.visual.positional_embedding.detach(), expected)
    # every other weight comes from the file unchanged
    torch.testing.assert_close(model.visual.conv1.weight, square.visual.conv1.weight)
    torch.testing.assert_close(model.token_embedding.weight, square.token_embedding.weight)


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_clip(BackboneConfig("tpr-tiny", str(tmp_path / "nope.pt")))


def test_failed_download_says_how_to_pass_a_local_file(monkeypatch):
    import open_clip.factory

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    # The real failure (no route to the hub) takes ~45 s of retries; the wrapping is what we test.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    with pytest.raises(ConfigError, match="--pretrained /path/to"):
        build_clip(BackboneConfig("ViT-B-16", "openai"))


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_clip(BackboneConfig("ViT-Nope", None))


def test_tokenizer_keeps_eos_when_truncating():
    tok = get_tokenizer(BackboneConfig("tpr-tiny", None))
    ids = tok(["word " * 200])[0]
    assert ids.shape[0] == 77
    assert int(ids[-1]) == tok.eot_token_id
