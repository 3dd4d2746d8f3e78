import os
import time

import pytest
import torch

from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.model.checkpoint import BEST_FILE, load_method, resolve_checkpoint, save_checkpoint
from tpr_ray.errors import ConfigError
from tpr_ray.methods import get_method
from tpr_ray.io.storage import write_json
from tests.helpers import TINY


def tiny_baseline(num_classes=7):
    cls = get_method("baseline")
    return cls(BackboneConfig(**TINY), cls.default_recipe.override(lr=3e-4), num_classes)


def test_saved_checkpoint_loads_back_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    method = tiny_baseline().eval()
    save_checkpoint(method, str(tmp_path / "ckpt"), {"stage": 0, "epoch": 1})
    loaded, config = load_method(str(tmp_path / "ckpt"))
    images, tokens = torch.randn(2, 3, 384, 128), method.tokenize(["a man in a red coat", "a woman"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), method.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), method.encode_text(tokens), rtol=0, atol=0)
    assert config["recipe"]["lr"] == 3e-4 and config["embed_dim"] == 64 and config["num_classes"] == 7


def test_run_directory_resolves_to_its_best_checkpoint(tmp_path):
    save_checkpoint(tiny_baseline(), str(tmp_path / "run" / "checkpoint_a"), {})
    write_json(str(tmp_path / "run" / BEST_FILE), {"checkpoint": str(tmp_path / "run" / "checkpoint_a")})
    assert resolve_checkpoint(str(tmp_path / "run")) == str(tmp_path / "run" / "checkpoint_a")
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        resolve_checkpoint(str(tmp_path))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_checkpoint(tiny_baseline(num_classes=7), str(tmp_path / "ckpt"), {})
    torch.save({"clip.bogus": torch.zeros(1)}, tmp_path / "ckpt" / "model.pt")
    with pytest.raises(ConfigError, match="does not match"):
        load_method(str(tmp_path / "ckpt"))


def test_remote_checkpoints_are_cached_by_content_and_the_cache_is_bounded(tmp_path, monkeypatch):
    import fsspec

    from tpr_ray.model import checkpoint as ckpt
    monkeypatch.setenv(ckpt.CACHE_ENV, str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    torch.manual_seed(0)
    save_checkpoint(tiny_baseline(), str(tmp_path / "a"), {})
    memory.put(str(tmp_path / "a"), "/remote/ckpt", recursive=True)
    uri = "memory:///remote/ckpt"

    first = ckpt.local_copy(uri)
    assert ckpt.local_copy(uri) == first  # every actor / restart / search on the node reuses it
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first)]
    loaded, _ = load_method(uri)

    time.sleep(0.01)  # other weights rewritten at the same URI: another copy, never the stale one
    torch.manual_seed(1)
    save_checkpoint(tiny_baseline(), str(tmp_path / "b"), {})
    memory.put(str(tmp_path / "b" / "model.pt"), "/remote/ckpt/model.pt")
    second = ckpt.local_copy(uri)
    assert second != first
    assert open(os.path.join(second, "model.pt"), "rb").read() == open(tmp_path / "b" / "model.pt", "rb").read()

    # bounded: with room for one copy, the least recently used one goes
    size = sum(os.path.getsize(os.path.join(second, f)) for f in os.listdir(second))
    monkeypatch.setenv(ckpt.CACHE_BYTES_ENV, str(size + 10))
    memory.put(str(tmp_path / "a" / "model.pt"), "/remote/other/model.pt")
    memory.put(str(tmp_path / "a" / "config.json"), "/remote/other/config.json")
    third = ckpt.local_copy("memory:///remote/other")
    assert os.listdir(tmp_path / "cache") == [os.path.basename(third)]


def test_loading_a_checkpoint_does_not_claim_the_model_is_randomly_initialised(tmp_path, caplog):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" for a model built
    without weights; a checkpoint's weights are loaded right after, so the warning would be false."""
    import logging

    save_checkpoint(tiny_baseline(), str(tmp_path / "ckpt"), {"stage": 0})
    with caplog.at_level(logging.WARNING):
        tiny_baseline()  # a fresh random model: open_clip's warning is true here and stays
        fresh = [r.getMessage() for r in caplog.records]
        caplog.clear()
        load_method(str(tmp_path / "ckpt"))
    assert any("No pretrained weights loaded" in m for m in fresh)
    assert not [r.getMessage() for r in caplog.records if "pretrained" in r.getMessage()]
