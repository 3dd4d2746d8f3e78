"""The Python API: tpr_ray.load(run or checkpoint) -> encode_text / encode_images."""

import json
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tpr-tiny baseline checkpoint written without Ray, inside a run folder with best.json."""
    import torch

    from tpr_ray.methods.backbone import BackboneConfig
    from tpr_ray.model.checkpoint import BEST_FILE, save_checkpoint
    from tpr_ray.methods import get_method

    torch.manual_seed(0)
    cls = get_method("baseline")
    method = cls(BackboneConfig(model="tpr-tiny", pretrained=None, image_size=(64, 32)), cls.default_recipe, 5)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(method, str(run / "checkpoint_0"), {"epoch": 1})
    (run / BEST_FILE).write_text(json.dumps({"checkpoint": str(run / "checkpoint_0")}))
    return method.eval(), str(run)


def test_load_encodes_like_the_method_itself(checkpoint, tmp_path):
    import torch
    from PIL import Image

    import tpr_ray
    from tpr_ray.model.encode import encode_captions, encode_images

    method, run = checkpoint
    model = tpr_ray.load(run)
    assert model.method == "baseline" and model.embed_dim == method.embed_dim
    texts = ["a man in a blue jacket", "a woman with a red bag", "a child in green"]
    got = model.encode_text(texts)
    want = encode_captions(method, texts, torch.device("cpu"))
    assert got.shape == (3, model.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 32, 3), dtype=np.uint8)  # already the model's size
    Image.fromarray(pixels).save(tmp_path / "crop.png")
    by_path = model.encode_images([str(tmp_path / "crop.png")])
    by_pil = model.encode_images([Image.fromarray(pixels)])
    by_array = model.encode_images(pixels)  # one image, not in a list
    want = encode_images(method, pixels[None], torch.device("cpu"))
    for got in (by_path, by_pil, by_array):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert tuple(model.transform(pixels).shape) == (3, 64, 32)


def test_bad_image_input_is_a_clear_error(checkpoint):
    import tpr_ray
    from tpr_ray.errors import ConfigError

    model = tpr_ray.load(checkpoint[1])
    with pytest.raises(ConfigError, match="HxWx3 uint8"):
        model.encode_images([np.zeros((8, 8), np.float32)])


def test_import_is_cheap_and_exports_are_lazy():
    code = ("import sys, tpr_ray; assert 'torch' not in sys.modules and 'ray' not in sys.modules; "
            "assert callable(tpr_ray.load) and callable(tpr_ray.search); print(tpr_ray.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
