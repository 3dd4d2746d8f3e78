"""PD, Prompt Decoupling (arXiv 2401.02173): adapt to the domain with prompts, then to the task.

Stage 1 ("prompts", domain adaptation): CLIP is frozen and only two sets of learnable
prompt vectors train, with the SDM retrieval loss:

- text side: ``n_text_prompts`` context vectors shared by every caption, placed right
  after [SOS] in the token-embedding sequence. The caption shifts right, so it is
  tokenised to ``77 - n_text_prompts`` tokens (an over-long caption is cut and keeps
  its [EOS]); the text feature is the [EOS] output, which now sits after the prompts.
- image side: ``n_image_prompts`` visual prompt vectors appended after the patch
  tokens at the input of the image encoder (after the positional embedding, before
  ``ln_pre``; they carry no position). Their outputs are dropped before pooling, so the
  image feature is still CLIP's [CLS].
- depth (``prompt_depth``): "shallow" (default) puts prompts only at the input; "deep"
  also gives every later layer of both encoders fresh prompts that replace the previous
  layer's prompt outputs (as CSKT and MaPLe do).

Stage 2 ("finetune", task adaptation): the prompts are frozen at their stage-1 values
and the CLIP towers are fine-tuned with the baseline recipe (SDM + ID loss, the ID
classifier trains too; the logit scale stays fixed, as the temperature is set by the
recipe).

The paper gives neither code nor its prompt depth, lengths, per-stage losses or epoch
split; the defaults are ours, see ``PDRecipe`` (and docs/methods.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tpr_ray.errors import ConfigError
from tpr_ray.methods import clip_blocks
from tpr_ray.methods.base import Method, Stage
from tpr_ray.methods.baseline import Baseline, BaselineRecipe, identity_classifier, sdm_and_id_losses

PROMPT_PARAMETERS = ("text_prompts", "image_prompts", "deep_text_prompts", "deep_image_prompts")
PROMPT_DEPTHS = ("shallow", "deep")


@dataclass(frozen=True)
class PDRecipe(BaselineRecipe):
    """The baseline recipe (which stage 2 uses as is: ``epochs``, ``lr`` ... are stage 2's)
    plus the prompts and stage 1.

    Defaults, chosen by us since the paper does not state them:

    - 4 text prompts, initialised from the embeddings of "a photo of a": the CoOp/CSKT
      length; each text prompt takes one of the 77 positions from the caption, and 73
      leave room for nearly every CUHK-PEDES/ICFG-PEDES caption.
    - 8 image prompts: they take nothing from the image (the sequence grows from 193 to
      201 tokens, about 4 % more compute) and, being shallow, act only through the input,
      so a few more than on the text side give stage 1 some capacity on the image side.
    - shallow prompts (input only), the paper's description of prompt tuning.
    - stage 1: 10 epochs with 1 warm-up epoch, lr 1e-3 (prompt tuning works at a far
      higher lr than fine-tuning: a few thousand parameters on a frozen network),
      SDM only (there is no task head yet: the ID classifier belongs to stage 2).
    """

    n_text_prompts: int = 4
    n_image_prompts: int = 8
    text_prompt_init: str = "a photo of a"  # "": N(0, 0.02); a shorter phrase takes the last positions
    prompt_depth: str = "shallow"  # shallow | deep
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
    default_recipe = PDRecipe(**dataclasses.asdict(Baseline.default_recipe))
    new_module_prefixes = Baseline.new_module_prefixes

    def __init__(self, backbone, recipe, num_classes, clip=None):
        super().__init__(backbone, recipe, num_classes, clip)
        recipe, clip = self.recipe, self.clip
        if not hasattr(clip, "token_embedding") or getattr(clip, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise ConfigError(f"PD needs a CLIP whose text tower pools the [EOS] token; {backbone.model} is not one")
        if not 0 <= recipe.n_text_prompts <= clip.context_length - 2:
            raise ConfigError(f"n_text_prompts must be between 0 and {clip.context_length - 2} "
                              f"(the caption needs [SOS] and [EOS]), got {recipe.n_text_prompts}")
        if recipe.n_image_prompts < 0:
            raise ConfigError(f"n_image_prompts must be 0 or more, got {recipe.n_image_prompts}")
        if recipe.prompt_depth not in PROMPT_DEPTHS:
            raise ConfigError(f"prompt_depth must be one of {', '.join(PROMPT_DEPTHS)}, got {recipe.prompt_depth!r}")
        self.eos_id = int(self.tokenizer.eot_token_id)
        image_width, text_width = clip.visual.conv1.out_channels, clip.token_embedding.embedding_dim
        self.text_prompts = nn.Parameter(self._initial_text_prompts(recipe))
        self.image_prompts = nn.Parameter(torch.randn(recipe.n_image_prompts, image_width) * 0.02)
        if recipe.prompt_depth == "deep":
            text_layers, image_layers = len(clip.transformer.resblocks), len(clip.visual.transformer.resblocks)
            self.deep_text_prompts = nn.Parameter(torch.randn(text_layers - 1, recipe.n_text_prompts, text_width) * 0.02)
            self.deep_image_prompts = nn.Parameter(
                torch.randn(image_layers - 1, recipe.n_image_prompts, image_width) * 0.02)
        self.classifier = identity_classifier(self.embed_dim, num_classes)  # stage 2's ID loss
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

    def _deep(self, prompts_of_layer, start: int, n: int):
        """A layer hook replacing the ``n`` prompt outputs at ``start`` with the layer's own prompts."""
        if self.recipe.prompt_depth != "deep" or n == 0:
            return None

        def replace(layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                return x
            return torch.cat([x[:, :start], clip_blocks.batch_of(prompts_of_layer[layer - 1], x), x[:, start + n:]], dim=1)
        return replace

    # --- inference -------------------------------------------------------
    def tokenize(self, captions):
        return self.tokenizer(captions, context_length=self.clip.context_length - self.text_prompts.shape[0])

    def encode_text(self, tokens):
        clip, n = self.clip, self.text_prompts.shape[0]
        tokens = fit_tokens(tokens, clip.context_length - n, self.eos_id)
        x = clip_blocks.text_tokens(clip, tokens, self.text_prompts)
        x = clip_blocks.run_blocks(clip.transformer, x, clip_blocks.text_attention_mask(clip, x.shape[1]),
                              before=self._deep(getattr(self, "deep_text_prompts", None), 1, n))
        return clip_blocks.project_text(clip, clip_blocks.pool_text(clip, x, tokens, offset=n))

    def encode_image(self, images):
        visual, n = self.clip.visual, self.image_prompts.shape[0]
        x = clip_blocks.image_tokens(visual, images)
        keep = x.shape[1]  # [CLS] + patches
        x = visual.ln_pre(torch.cat([x, clip_blocks.batch_of(self.image_prompts, x)], dim=1))
        x = clip_blocks.run_blocks(visual.transformer, x,
                              before=self._deep(getattr(self, "deep_image_prompts", None), keep, n))
        return clip_blocks.project_image(visual, clip_blocks.pool_image(visual, x[:, :keep]))  # CLIP's own pooling

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
        return sdm_and_id_losses(self.classifier, self.encode_image(batch["images"]),
                                 self.encode_text(batch["tokens"]), batch, self._active)
