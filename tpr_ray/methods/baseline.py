"""Baseline: full CLIP fine-tune with SDM + identity losses (IRRA without its MLM head)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tpr_ray.methods.losses import id_loss, sdm_loss
from tpr_ray.methods import clip_blocks
from tpr_ray.methods.base import Method, Recipe, Stage


@dataclass(frozen=True)
class BaselineRecipe(Recipe):
    """IRRA's recipe plus its loss settings: SDM at a fixed temperature, ID loss weight."""

    temperature: float = 0.02
    id_loss_weight: float = 1.0


def identity_classifier(embed_dim: int, num_classes: int) -> nn.Linear:
    """IRRA's shared ID classifier: N(0, 0.001) weights, zero bias."""
    classifier = nn.Linear(embed_dim, num_classes)
    nn.init.normal_(classifier.weight, std=0.001)
    nn.init.zeros_(classifier.bias)
    return classifier


def sdm_and_id_losses(classifier: nn.Module, image_feats, text_feats, batch: dict, recipe: BaselineRecipe) -> dict:
    """SDM, plus the ID loss when the recipe weighs it (for every method built on IRRA's recipe)."""
    sdm = sdm_loss(image_feats, text_feats, batch["person_ids"], recipe.temperature)
    if recipe.id_loss_weight == 0:
        return {"loss": sdm, "sdm": sdm}
    ident = id_loss(classifier, image_feats, text_feats, batch["labels"])
    return {"loss": sdm + recipe.id_loss_weight * ident, "sdm": sdm, "id": ident}


class Baseline(Method):
    """Full CLIP fine-tune with SDM + ID losses (IRRA's recipe, no MLM head)."""

    name = "baseline"
    default_recipe = BaselineRecipe(
        epochs=60, batch_size=64, lr=1e-5, new_module_lr_mult=5.0, bias_lr_mult=2.0,
        weight_decay=4e-5, adam_eps=1e-3, warmup_epochs=5, temperature=0.02, id_loss_weight=1.0,
    )
    new_module_prefixes = ("classifier.",)

    def __init__(self, backbone, recipe, num_classes, clip=None):
        super().__init__(backbone, recipe, num_classes, clip)
        self.classifier = identity_classifier(self.embed_dim, num_classes)

    def encode_image(self, images):
        return clip_blocks.encode_image(self.clip, images)

    def encode_text(self, tokens):
        return clip_blocks.encode_text(self.clip, tokens)

    def forward(self, batch):
        return sdm_and_id_losses(self.classifier, self.encode_image(batch["images"]),
                                 self.encode_text(batch["tokens"]), batch, self.recipe)

    def stages(self):
        # The temperature is fixed by the recipe, so CLIP's learnable logit scale stays frozen.
        return [Stage("finetune", self.recipe, lambda name: name != "clip.logit_scale")]
