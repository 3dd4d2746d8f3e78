"""The decoded-image cache: built once by Ray Data from the embedding decode stage, then trained from."""

import numpy as np
import pytest

from tpr_ray import storage
from tpr_ray.images import decode_image, resize_uint8
from tpr_ray.train import TrainConfig, train
from tpr_ray.train_cache import SIDECAR, load_cache
from tests.helpers import TINY


@pytest.mark.slow
def test_training_from_the_decoded_cache(ray_cluster, cuhk_small, tmp_path):
    cache = tmp_path / "cache"
    cfg = TrainConfig(method="baseline", data=cuhk_small, out=str(tmp_path / "runs"), name="cached", **TINY,
                      image_size=(64, 32), loader_workers=0, max_steps=2, decoded_cache=str(cache),
                      overrides={"batch_size": 8, "epochs": 1})
    result = train(cfg)
    (folder,) = [p for p in cache.iterdir() if p.name.startswith("decoded-")]
    assert folder.name.endswith("-64x32") and (folder / SIDECAR).exists()
    pixels = load_cache(str(folder), (64, 32))
    uri = sorted(pixels)[0]
    expected = resize_uint8(decode_image(storage.read_bytes(uri), (64, 32)), (64, 32))
    np.testing.assert_array_equal(pixels[uri], expected)  # the embedding job's decode, byte for byte
    assert result.best_metrics["global_step"] == 2
