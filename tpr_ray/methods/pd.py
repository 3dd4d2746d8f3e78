"""PD, Prompt Decoupling (arXiv 2401.02173): adapt to the domain with prompts, then to the task.

Stage 1 ("prompts", domain adaptation): CLIP is frozen and only two sets of learnable
prompt vectors train, with the SDM retrieval loss:

- text side: ``n_text_prompts`` context vectors shared by every caption, placed right
  after [SOS] in the token-embedding sequence. The caption shifts right, so it is
  tokenised to ``77 - n_text_prompts`` tokens (an over-long caption is cut and keeps
  its [EOS]); the text feature is the [EOS] output, which now sits after the prompts.
- image side: ``n_image_prompts`` visual prompt vectors appended after the patch
  tokens, once, at the input of the image encoder (shallow prompts: after the
  positional embedding, before ``ln_pre``; they carry no position). Their outputs are
  dropped before pooling, so the image feature is still CLIP's [CLS].

Stage 2 ("finetune", task adaptation): the prompts are frozen at their stage-1 values
and the CLIP towers are fine-tuned with the baseline recipe (SDM + ID loss, the ID
classifier trains too; the logit scale stays fixed, as the temperature is set by the
recipe).

The paper does not give its prompt lengths or epoch split; the defaults are ours, see
``PDRecipe``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tpr_ray.backbone import eos_token_id
from tpr_ray.errors import ConfigError
from tpr_ray.losses import id_loss, sdm_loss
from tpr_ray.methods.base import Method, Recipe, Stage

PROMPT_PARAMETERS = ("text_prompts", "image_prompts")


@dataclass(frozen=True)
class PDRecipe(Recipe):
    """The baseline recipe (which stage 2 uses as is: ``epochs``, ``lr`` ... are stage 2's)
    plus the prompts and stage 1.

    Defaults, chosen by us since the paper does not state them:

    - 4 text prompts, initialised from the embeddings of "a photo of a": the CoOp/CSKT
      length; each text prompt takes one of the 77 positions from the caption, and 73
      leave room for nearly every CUHK-PEDES/ICFG-PEDES caption.
    - 8 image prompts: they take nothing from the image (the sequence grows from 193 to
      201 tokens, about 4 % more compute) and, being shallow, act only through the input,
      so a few more than on the text side give stage 1 some capacity on the image side.
    - stage 1: 10 epochs with 1 warm-up epoch, lr 1e-3 (prompt tuning works at a far
      higher lr than fine-tuning: a few thousand parameters on a frozen network),
      SDM only (there is no task head yet: the ID classifier belongs to stage 2).
    """

    n_text_prompts: int = 4
    n_image_prompts: int = 8
    text_prompt_init: str = "a photo of a"  # "": N(0, 0.02); a shorter phrase takes the last positions
    stage1_epochs: int = 10
    stage1_lr: float = 1e-3
    stage1_warmup_epochs: int = 1


def fit_tokens(tokens: torch.Tensor, length: int, eos_id: int) -> torch.Tensor:
    """Cut token rows to ``length``, ending a cut caption with [EOS] as the tokenizer does."""
    if tokens.shape[1] <= length:
        return tokens
    cut = tokens[:, :length].clone()
    lost_eos = ~(cut == eos_id).any(dim=1)
    cut[lost_eos, -1] = eos_id
    return cut


def is_prompt(name: str) -> bool:
    return name in PROMPT_PARAMETERS


def is_finetuned(name: str) -> bool:
    return (name.startswith("clip.") and name != "clip.logit_scale") or name.startswith("classifier.")


class PD(Method):
    """CLIP with learnable text and image prompts, trained in two decoupled stages."""

    name = "pd"
    default_recipe = PDRecipe(
        epochs=60, batch_size=64, lr=1e-5, new_module_lr_mult=5.0, bias_lr_mult=2.0,
        weight_decay=4e-5, adam_eps=1e-3, warmup_epochs=5, temperature=0.02, id_loss_weight=1.0,
    )
    new_module_prefixes = ("classifier.",)

    def __init__(self, backbone, recipe, num_classes):
        super().__init__(backbone, recipe, num_classes)
        if not isinstance(recipe, PDRecipe):
            recipe = self.recipe = PDRecipe(**recipe.to_dict())
        clip = self.clip
        if not hasattr(clip, "token_embedding") or getattr(clip, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise ConfigError(f"PD needs a CLIP whose text tower pools the [EOS] token; {backbone.model} is not one")
        if not 0 <= recipe.n_text_prompts <= clip.context_length - 2:
            raise ConfigError(f"n_text_prompts must be between 0 and {clip.context_length - 2} "
                              f"(the caption needs [SOS] and [EOS]), got {recipe.n_text_prompts}")
        if recipe.n_image_prompts < 0:
            raise ConfigError(f"n_image_prompts must be 0 or more, got {recipe.n_image_prompts}")
        self.eos_id = eos_token_id(self.tokenizer)
        self.text_prompts = nn.Parameter(self._initial_text_prompts(recipe))
        self.image_prompts = nn.Parameter(torch.randn(recipe.n_image_prompts, clip.visual.conv1.out_channels) * 0.02)
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)
        self._active = recipe  # the recipe of the stage being trained (its losses)

    def _initial_text_prompts(self, recipe: PDRecipe) -> torch.Tensor:
        n, embedding = recipe.n_text_prompts, self.clip.token_embedding
        prompts = torch.randn(n, embedding.embedding_dim) * 0.02
        if recipe.text_prompt_init and n:
            ids = self.tokenizer([recipe.text_prompt_init])[0]
            words = ids[1:int((ids == self.eos_id).nonzero()[0])]
            if len(words) > n:
                raise ConfigError(f"text_prompt_init {recipe.text_prompt_init!r} is {len(words)} tokens, "
                                  f"more than n_text_prompts={n}; shorten it or pass text_prompt_init=''")
            with torch.no_grad():
                prompts[n - len(words):] = embedding(words).float()  # the phrase ends next to the caption
        return prompts

    # --- inference -------------------------------------------------------
    def tokenize(self, captions):
        return self.tokenizer(captions, context_length=self.clip.context_length - self.text_prompts.shape[0])

    def encode_text(self, tokens):
        clip, n = self.clip, self.text_prompts.shape[0]
        tokens = fit_tokens(tokens, clip.context_length - n, self.eos_id)
        dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(dtype)
        prompts = self.text_prompts.to(dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
        length = x.shape[1]
        x = x + clip.positional_embedding[:length].to(dtype)
        mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
        x = clip.ln_final(clip.transformer(x, attn_mask=mask))
        eos = (tokens == self.eos_id).int().argmax(dim=1) + n
        x = x[torch.arange(x.shape[0], device=x.device), eos]
        if isinstance(clip.text_projection, nn.Linear):
            return clip.text_projection(x)
        return x @ clip.text_projection

    def encode_image(self, images):
        visual = self.clip.visual
        x = visual.conv1(images)
        x = x.flatten(2).transpose(1, 2)  # (N, patches, width)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        tokens = x.shape[1]
        prompts = self.image_prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = visual.ln_pre(torch.cat([x, prompts], dim=1))
        x = visual.transformer(x)[:, :tokens]  # CLIP's own pooling, over [CLS] and patches only
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    # --- training --------------------------------------------------------
    def stages(self):
        r = self.recipe
        prompt_recipe = dataclasses.replace(r, epochs=r.stage1_epochs, lr=r.stage1_lr,
                                            warmup_epochs=r.stage1_warmup_epochs, id_loss_weight=0.0)
        return [Stage("prompts", prompt_recipe, is_prompt), Stage("finetune", r, is_finetuned)]

    def set_stage(self, stage):
        super().set_stage(stage)
        self._active = stage.recipe

    def forward(self, batch):
        recipe = self._active
        image_feats = self.encode_image(batch["images"])
        text_feats = self.encode_text(batch["tokens"])
        sdm = sdm_loss(image_feats, text_feats, batch["person_ids"], recipe.temperature)
        if recipe.id_loss_weight == 0:
            return {"loss": sdm, "sdm": sdm}
        ident = id_loss(self.classifier, image_feats, text_feats, batch["labels"])
        return {"loss": sdm + recipe.id_loss_weight * ident, "sdm": sdm, "id": ident}
