"""OpenAI CLIP parity: weights in OpenAI's format must give OpenAI's own features.

The oracle is OpenAI's reference code (``clip-anytorch``: ``clip.model.build_model``).
A tiny OpenAI-architecture CLIP (2 layers, width 128; ``build_model`` derives the whole
architecture from the state dict) with random weights is saved as OpenAI ships its
weights (half precision), then loaded through ``tpr_ray.methods.backbone`` exactly as
``--pretrained FILE`` does. Comparisons run in fp32 at the native 224 x 224 resolution.
"""

import json

import numpy as np
import open_clip
import open_clip.factory
import open_clip.pretrained
import pytest
import torch
from PIL import Image



def _import_openai_clip():
    """OpenAI's ``clip`` package; it imports ``packaging`` through ``pkg_resources``, which
    setuptools >= 81 no longer ships, so that one name is lent to it during the import."""
    import sys
    import types

    import packaging.version

    lent = "pkg_resources" not in sys.modules
    if lent:
        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    try:
        import clip
        import clip.model
    finally:
        if lent:
            del sys.modules["pkg_resources"]
    return clip


clip = _import_openai_clip()
openai_model = clip.model

from tpr_ray.methods.backbone import BackboneConfig, build_clip, get_tokenizer  # noqa: E402

ARCH = "tpr-test-openai-tiny"  # open_clip's name for the architecture below
CAPTIONS = ["a woman in a red coat with a black backpack", "a man wearing blue jeans and white shoes", "person"]


def _open_clip_config(quick_gelu: bool | None = None) -> dict:
    cfg = {"embed_dim": 64,
           "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    return cfg


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory):
    """(path of an OpenAI-format state dict, OpenAI's own model built from that file)."""
    folder = tmp_path_factory.mktemp("openai")
    (folder / f"{ARCH}.json").write_text(json.dumps(_open_clip_config()))
    (folder / f"{ARCH}-quickgelu.json").write_text(json.dumps(_open_clip_config(quick_gelu=True)))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = openai_model.CLIP(64, 224, 2, 128, 16, 77, 49408, 128, 2, 2)
    with torch.no_grad():  # OpenAI's init leaves biases 0 and norms 1: perturb every weight
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    openai_model.convert_weights(model)  # OpenAI ships its weights in half precision
    path = folder / "openai-tiny.pt"
    torch.save(model.state_dict(), path)
    reference = openai_model.build_model(torch.load(path, weights_only=True)).float().eval()
    return str(path), reference


def _features(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images).float(), model.encode_text(tokens).float()


def _max_abs_diff(ours, reference):
    torch.manual_seed(1)
    images = torch.randn(4, 3, 224, 224)
    tokens = clip.tokenize(CAPTIONS)
    ours_image, ours_text = _features(ours.eval(), images, tokens)
    ref_image, ref_text = _features(reference, images, tokens)
    return max(float((ours_image - ref_image).abs().max()), float((ours_text - ref_text).abs().max()))


def _activations(model) -> set[str]:
    return {type(block.mlp.gelu).__name__ for block in
            [*model.visual.transformer.resblocks, *model.transformer.resblocks]}


def test_openai_format_file_gives_openais_features_to_fp32_precision(openai_file):
    path, reference = openai_file
    ours = build_clip(BackboneConfig(ARCH, path, (224, 224)))
    diff = _max_abs_diff(ours, reference)
    print(f"\nOpenAI-format file through tpr_ray.methods.backbone: max abs feature difference {diff:.3e}")
    assert _activations(ours) == {"QuickGELU"}
    assert diff < 1e-5


def test_tokenizer_equals_openais(openai_file):
    ours = get_tokenizer(BackboneConfig(ARCH, None))(CAPTIONS + ["word " * 100])
    assert torch.equal(ours, clip.tokenize(CAPTIONS + ["word " * 100], truncate=True).to(ours.dtype))


def test_a_quickgelu_name_builds_quickgelu(openai_file):
    path, reference = openai_file
    model = build_clip(BackboneConfig(f"{ARCH}-quickgelu", path, (224, 224)))
    assert _activations(model) == {"QuickGELU"}
    assert _max_abs_diff(model, reference) < 1e-5


def test_resolved_activation_is_recorded_so_a_checkpoint_rebuilds_it(openai_file):
    from tpr_ray.methods import get_method

    path, _ = openai_file
    cls = get_method("baseline")
    method = cls(BackboneConfig(ARCH, path, (224, 224)), cls.default_recipe, num_classes=3)
    assert method.backbone_config.quick_gelu is True
    rebuilt = build_clip(BackboneConfig.from_dict({**method.backbone_config.to_dict(), "pretrained": None}))
    assert _activations(rebuilt) == {"QuickGELU"}
    # checkpoints written before the field existed rebuild what they were trained with
    old = BackboneConfig.from_dict({"model": ARCH, "pretrained": None, "image_size": [224, 224]})
    assert old.quick_gelu is None and _activations(build_clip(old)) == {"GELU"}


@pytest.fixture()
def fake_tags(openai_file, monkeypatch):
    """Two pretrained tags of the test architecture, served from the local file (no download)."""
    path, _ = openai_file
    tags = {"openai": open_clip.pretrained._pcfg(url="https://example.invalid/openai.pt", quick_gelu=True),
            "othertag": open_clip.pretrained._pcfg(hf_hub="example/other/")}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, ARCH, tags)
    requested = []

    def serve(cfg, *args, **kwargs):
        requested.append(cfg)
        return path

    monkeypatch.setattr(open_clip.factory, "download_pretrained", serve)
    return requested


def test_openai_tag_builds_quickgelu_from_its_pretrained_config(fake_tags, openai_file):
    _, reference = openai_file
    model = build_clip(BackboneConfig(ARCH, "openai", (224, 224)))
    assert fake_tags and fake_tags[0]["quick_gelu"] is True  # the tag's own config was used
    assert _activations(model) == {"QuickGELU"}
    assert _max_abs_diff(model, reference) < 1e-5


def test_other_tag_builds_what_its_pretrained_config_says(fake_tags):
    assert _activations(build_clip(BackboneConfig(ARCH, "othertag", (224, 224)))) == {"GELU"}
    # ... even when the architecture's own name asks for QuickGELU: the weights decide
    fake_tags.clear()
    open_clip.pretrained._PRETRAINED[f"{ARCH}-quickgelu"] = open_clip.pretrained._PRETRAINED[ARCH]
    try:
        assert _activations(build_clip(BackboneConfig(f"{ARCH}-quickgelu", "othertag", (224, 224)))) == {"GELU"}
    finally:
        del open_clip.pretrained._PRETRAINED[f"{ARCH}-quickgelu"]


def test_an_explicit_activation_wins(openai_file):
    path, _ = openai_file
    assert _activations(build_clip(BackboneConfig(ARCH, path, (224, 224), quick_gelu=False))) == {"GELU"}
    assert _activations(build_clip(BackboneConfig(ARCH, None, (224, 224), quick_gelu=True))) == {"QuickGELU"}


def _pil_bicubic_antialias(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float grid resized channel by channel with Pillow's BICUBIC filter.

    Pillow's resampling is an independent C implementation of the same filter family
    open_clip asks torch for (bicubic, a = -0.5, support widened by the scale factor when
    shrinking, i.e. antialiased); torch's ``antialias=True`` was written to match it.
    """
    height, width = size
    channels = [np.asarray(Image.fromarray(grid[:, :, c].astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BICUBIC)) for c in range(grid.shape[2])]
    return np.stack(channels, axis=-1)


def test_positional_embedding_is_resized_to_24x8_by_antialiased_bicubic(openai_file):
    """Stated method: open_clip's resize (bicubic, antialiased; IRRA uses bilinear), [CLS] kept."""
    path, reference = openai_file
    model = build_clip(BackboneConfig(ARCH, path, (384, 128)))
    assert tuple(model.visual.grid_size) == (24, 8)
    old = reference.visual.positional_embedding.detach().float().numpy()  # 1 + 14 x 14 rows
    expected = _pil_bicubic_antialias(old[1:].reshape(14, 14, -1), (24, 8)).reshape(24 * 8, -1)
    got = model.visual.positional_embedding.detach().numpy()
    np.testing.assert_array_equal(got[0], old[0])
    np.testing.assert_allclose(got[1:], expected, atol=2e-6)
    bilinear = torch.nn.functional.interpolate(torch.from_numpy(old[1:].reshape(1, 14, 14, -1)).permute(0, 3, 1, 2),
                                               size=(24, 8), mode="bilinear", align_corners=False)
    assert np.abs(bilinear.permute(0, 2, 3, 1).reshape(24 * 8, -1).numpy() - got[1:]).max() > 1e-3  # not bilinear


# Every method builds its towers through the one backbone function, and with its own
# additions switched off, its encoders are OpenAI's.
NEUTRAL = {"baseline": {}, "pd": {"n_text_prompts": 0, "n_image_prompts": 0},
           "cskt": {"prompt_length": 0, "image_adapter_scale": 0.0, "text_adapter_scale": 0.0}, "cfine": {}}


@pytest.mark.parametrize("name", list(NEUTRAL))
def test_every_method_builds_its_towers_through_build_clip(name, openai_file, monkeypatch):
    import tpr_ray.methods.base as base
    from tpr_ray.methods import get_method

    path, reference = openai_file
    built = []

    def recording_build_clip(cfg):
        built.append(base.build_clip.__wrapped__(cfg))
        return built[-1]

    recording_build_clip.__wrapped__ = base.build_clip
    monkeypatch.setattr(base, "build_clip", recording_build_clip)
    cls = get_method(name)
    method = cls(BackboneConfig(ARCH, path, (224, 224)), cls.default_recipe.override(**NEUTRAL[name]), 3).eval()
    assert len(built) == 1 and method.clip is built[0]
    assert _activations(method.clip) == {"QuickGELU"}

    torch.manual_seed(1)
    images, tokens = torch.randn(2, 3, 224, 224), clip.tokenize(CAPTIONS[:2])
    ref_image, ref_text = _features(reference, images, tokens)
    with torch.no_grad():
        if name == "cfine":  # its global features, before the necks, are the towers' own
            ours_image = method.image_side(images).global_token
            ours_text = method.text_side(method.tokenize(CAPTIONS[:2])).global_token
        else:
            ours_image = method.encode_image(images)
            ours_text = method.encode_text(method.tokenize(CAPTIONS[:2]))
    assert float((ours_image - ref_image).abs().max()) < 1e-5
    assert float((ours_text - ref_text).abs().max()) < 1e-5
