"""The shared tower helpers, and the rules every method's recipe follows."""

import dataclasses

import pytest
import torch

from tpr_ray.methods.backbone import BackboneConfig, build_clip
from tpr_ray.errors import ConfigError
from tpr_ray.methods import Recipe, available, clip_blocks, get_method
from tests.conftest import TINY


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip(BackboneConfig(**TINY, image_size=(64, 32))).eval()


def test_composed_helpers_equal_open_clips_own_encoders(clip):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 32)
    tokens = torch.zeros(3, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[0, 4], tokens[1, 2], tokens[2, 6] = 49406, 300, 49407, 49407, 49407
    with torch.no_grad():
        assert torch.equal(clip_blocks.encode_image(clip, images), clip.encode_image(images))
        assert torch.equal(clip_blocks.encode_text(clip, tokens), clip.encode_text(tokens))


def test_run_blocks_hooks_see_every_layer_and_the_last_attention_is_a_distribution(clip):
    seen, ran = [], []
    x = torch.randn(2, 5, clip.transformer.width)

    def before(layer, x):
        seen.append(layer)
        return x

    def run(layer, block, x, mask):
        ran.append(layer)
        return block(x, attn_mask=mask)

    plain = clip_blocks.run_blocks(clip.transformer, x)
    hooked, attention = clip_blocks.run_blocks(clip.transformer, x, before=before, run=run, last_attention=True)
    layers = len(clip.transformer.resblocks)
    assert seen == list(range(layers)) and ran == list(range(layers - 1))  # the last one is run for its attention
    torch.testing.assert_close(hooked, plain)
    assert attention.shape == (2, 5, 5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 5))


def test_pool_text_takes_eos_at_an_offset(clip):
    x = torch.randn(2, 10, clip.transformer.width)
    tokens = torch.tensor([[49406, 5, 49407, 0, 0, 0], [49406, 5, 6, 7, 49407, 0]])
    pooled = clip_blocks.pool_text(clip, x, tokens, offset=3)
    torch.testing.assert_close(pooled, clip.ln_final(x)[[0, 1], [5, 7]])


# --- recipes and the registry -------------------------------------------------------------

def test_registry_names_every_method_for_the_cli():
    assert available() == ["baseline", "cskt", "pd", "cfine"]
    for name in available():
        assert get_method(name).name == name


def test_each_method_takes_only_its_own_recipe_type():
    cls = get_method("cskt")
    with pytest.raises(ConfigError, match="takes a CSKTRecipe.*default_recipe.override"):
        cls(BackboneConfig(**TINY), Recipe(), num_classes=2)


def test_a_recipe_holds_only_the_loss_settings_its_method_reads():
    fields = {name: {f.name for f in dataclasses.fields(get_method(name).default_recipe)} for name in available()}
    assert {"temperature", "id_loss_weight"} <= fields["baseline"] and {"temperature", "id_loss_weight"} <= fields["pd"]
    assert "temperature" in fields["cskt"] and "id_loss_weight" not in fields["cskt"]  # SDM only
    assert not {"temperature", "id_loss_weight"} & fields["cfine"]  # CMPM/CMPC/triplet have their own
    assert {f.name for f in dataclasses.fields(Recipe)} & {"temperature", "id_loss_weight"} == set()


def test_schedule_unit_defaults_to_epoch_and_is_checked():
    for name in available():
        assert get_method(name).default_recipe.schedule_unit == "epoch"
    assert Recipe().override(schedule_unit="step").schedule_unit == "step"
    with pytest.raises(ConfigError, match="schedule_unit.*epoch, step"):
        Recipe().override(schedule_unit="iteration")


def test_irra_classifier_bias_gets_the_new_module_multiplier_only():
    cls = get_method("baseline")
    method = cls(BackboneConfig(**TINY), cls.default_recipe, num_classes=3)
    groups = {g["name"]: g for g in method.param_groups(cls.default_recipe)}
    assert groups["classifier.bias"]["lr"] == pytest.approx(5e-5)  # x5, not x5 x2
    assert groups["classifier.bias"]["weight_decay"] == 0.0
    assert groups["classifier.weight"]["lr"] == pytest.approx(5e-5)
    assert groups["clip.visual.conv1.weight"]["lr"] == pytest.approx(1e-5)
    assert groups["clip.ln_final.bias"]["lr"] == pytest.approx(2e-5)
