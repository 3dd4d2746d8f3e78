"""Baseline: full CLIP fine-tune with SDM + identity losses (IRRA without its MLM head)."""

from __future__ import annotations

from torch import nn

from tpr_ray.losses import id_loss, sdm_loss
from tpr_ray.methods.base import Method, Recipe, Stage


class Baseline(Method):
    """Full CLIP fine-tune with SDM + ID losses (IRRA's recipe, no MLM head)."""

    name = "baseline"
    default_recipe = Recipe(
        epochs=60, batch_size=64, lr=1e-5, new_module_lr_mult=5.0, bias_lr_mult=2.0,
        weight_decay=4e-5, adam_eps=1e-3, warmup_epochs=5, temperature=0.02, id_loss_weight=1.0,
    )
    new_module_prefixes = ("classifier.",)

    def __init__(self, backbone, recipe, num_classes):
        super().__init__(backbone, recipe, num_classes)
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def encode_image(self, images):
        return self.clip.encode_image(images)

    def encode_text(self, tokens):
        return self.clip.encode_text(tokens)

    def forward(self, batch):
        image_feats = self.encode_image(batch["images"])
        text_feats = self.encode_text(batch["tokens"])
        sdm = sdm_loss(image_feats, text_feats, batch["person_ids"], self.recipe.temperature)
        ident = id_loss(self.classifier, image_feats, text_feats, batch["labels"])
        return {"loss": sdm + self.recipe.id_loss_weight * ident, "sdm": sdm, "id": ident}

    def stages(self):
        # The temperature is fixed by the recipe, so CLIP's learnable logit scale stays frozen.
        return [Stage("finetune", self.recipe, lambda name: name != "clip.logit_scale")]
