"""CSKT: CLIP-based Synergistic Knowledge Transfer (Liu et al., ICASSP 2024, arXiv 2309.09496).

The whole CLIP stays frozen. What learns (DESIGN.md §4):

- Bidirectional prompts (BPT). Every layer of both encoders has its own prompt vectors
  (4 per side by default). A per-layer pair of coupling projections maps the text prompts
  to image width and the image prompts to text width, so each encoder sees 8 prompt tokens
  per layer: its own 4, then the 4 projected from the other modality. Image side: appended
  after the patch tokens (after the positional embedding, before ``ln_pre``). Text side:
  right after [SOS], which shifts the caption and its [EOS] right by 8 inside the 77-token
  context. At every deeper layer the previous layer's prompt outputs are replaced by that
  layer's prompts, so sequence lengths never grow.
- Dual adapters (DAT). Beside the MLP of every block of both encoders:
  ``x = x + attn(ln_1 x);  x = x + mlp(ln_2 x) + s * adapter(ln_3 x)``, with the adapter
  Linear(d, d/8) -> ReLU -> Linear(d/8, d), its own LayerNorm, s = 0.1 (image) / 4 (text).

Training uses the SDM loss alone at a fixed temperature. A checkpoint holds only these
added weights plus the backbone reference (``pretrained``), from which CLIP is rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, ResidualAttentionBlock, VisionTransformer
from torch import nn

from tpr_ray.errors import ConfigError
from tpr_ray.methods.losses import sdm_loss
from tpr_ray.methods import clip_blocks
from tpr_ray.methods.base import Method, Recipe, Stage

TRAINABLE_PREFIXES = ("prompts.", "adapters.")


@dataclass(frozen=True)
class CSKTRecipe(Recipe):
    """The paper's optimisation recipe plus CSKT's own options (all overridable with --set)."""

    temperature: float = 0.02  # SDM, CSKT's only loss
    prompt_length: int = 4  # own prompt vectors per layer and side; each encoder sees twice as many tokens
    prompt_init: str = "a photo of a"  # phrase whose token embeddings start the layer-1 text prompts
    adapter_reduction: int = 8  # adapter bottleneck width = d / adapter_reduction
    image_adapter_scale: float = 0.1
    text_adapter_scale: float = 4.0


class Adapter(nn.Module):
    """LayerNorm -> Linear(d, d/r) -> ReLU -> Linear(d/r, d), run in parallel to a block's MLP."""

    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.ln = LayerNorm(width)
        self.down = nn.Linear(width, width // reduction)
        self.up = nn.Linear(width // reduction, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(self.ln(x))))


class CoupledPrompts(nn.Module):
    """Per-layer prompts of both encoders and the projections that couple them."""

    def __init__(self, depth: int, length: int, text_width: int, image_width: int):
        super().__init__()
        self.text = nn.Parameter(torch.empty(depth, length, text_width).normal_(std=0.02))
        self.image = nn.Parameter(torch.empty(depth, length, image_width).normal_(std=0.02))
        self.text_to_image = nn.ModuleList(nn.Linear(text_width, image_width) for _ in range(depth))
        self.image_to_text = nn.ModuleList(nn.Linear(image_width, text_width) for _ in range(depth))

    @property
    def tokens_per_layer(self) -> int:
        return 2 * self.text.shape[1]

    def image_tokens(self, layer: int) -> torch.Tensor:
        """(2 * length, image width): the layer's image prompts, then its projected text prompts."""
        return torch.cat([self.image[layer], self.text_to_image[layer](self.text[layer])])

    def text_tokens(self, layer: int) -> torch.Tensor:
        """(2 * length, text width): the layer's text prompts, then its projected image prompts."""
        return torch.cat([self.text[layer], self.image_to_text[layer](self.image[layer])])


def init_new_linear(module: nn.Module) -> None:
    """The reference's initialisation of every Linear CSKT adds: N(0, 0.02), bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def adapted_block(block: ResidualAttentionBlock, adapter: Adapter, scale: float, x: torch.Tensor,
                  attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One open_clip block with the adapter added beside its MLP, reading the same input."""
    x = x + block.ls_1(block.attention(block.ln_1(x), attn_mask=attn_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x))) + scale * adapter(x)


def _adapted(adapters: nn.ModuleList, scale: float) -> clip_blocks.BlockRunner:
    return lambda layer, block, x, mask: adapted_block(block, adapters[layer], scale, x, mask)


class CSKT(Method):
    """CSKT: frozen CLIP + bidirectional coupled prompts and dual adapters, SDM loss (ICASSP 2024)."""

    name = "cskt"
    # Every trainable weight is new, so one lr for all; biases get IRRA's x2 and no decay (the
    # CSKT code is built on IRRA's optimizer); SDM only, so there is no ID-loss setting.
    default_recipe = CSKTRecipe(
        epochs=60, batch_size=128, lr=3e-4, new_module_lr_mult=1.0, bias_lr_mult=2.0, weight_decay=4e-5,
        bias_weight_decay=0.0, adam_eps=1e-3, schedule="cosine", warmup_epochs=5, warmup_factor=0.1,
        temperature=0.02,
    )
    checkpoint_holds_backbone = False

    def __init__(self, backbone, recipe, num_classes, clip=None):
        super().__init__(backbone, recipe, num_classes, clip)  # num_classes is kept for the interface; no ID loss
        recipe = self.recipe
        self._check_backbone(recipe)
        self.clip.requires_grad_(False)
        text_blocks, image_blocks = self.clip.transformer.resblocks, self.clip.visual.transformer.resblocks
        text_width, image_width = self.clip.transformer.width, self.clip.visual.transformer.width
        self.prompts = CoupledPrompts(len(text_blocks), recipe.prompt_length, text_width, image_width)
        self.adapters = nn.ModuleDict({
            "image": nn.ModuleList(Adapter(image_width, recipe.adapter_reduction) for _ in image_blocks),
            "text": nn.ModuleList(Adapter(text_width, recipe.adapter_reduction) for _ in text_blocks),
        })
        self.prompts.apply(init_new_linear)
        self.adapters.apply(init_new_linear)
        # [SOS] + caption + [EOS] must fit in what the prompt tokens leave of the context.
        self.caption_room = self.clip.context_length - self.prompts.tokens_per_layer
        self.eos_id = int(self.tokenizer.eot_token_id)
        self._init_text_prompts(recipe.prompt_init)
        self.set_stage(self.stages()[0])

    def _check_backbone(self, recipe: CSKTRecipe) -> None:
        clip, model = self.clip, self.backbone_config.model
        if not isinstance(getattr(clip, "visual", None), VisionTransformer) or not hasattr(clip, "token_embedding"):
            raise ConfigError(f"CSKT needs a CLIP with a ViT image tower and CLIP's own text tower; "
                              f"{model} is not one (choose e.g. ViT-B-16)")
        if clip.visual.attn_pool is not None:
            raise ConfigError(f"CSKT does not support {model}'s attentional pooling; choose e.g. ViT-B-16")
        text_blocks, image_blocks = clip.transformer.resblocks, clip.visual.transformer.resblocks
        if len(text_blocks) != len(image_blocks):
            raise ConfigError(f"CSKT couples the two encoders layer by layer, but {model} has "
                              f"{len(image_blocks)} image and {len(text_blocks)} text layers")
        blocks = list(text_blocks) + list(image_blocks)
        if not all(type(b) is ResidualAttentionBlock for b in blocks) or not clip.transformer.batch_first:
            raise ConfigError(f"CSKT wraps open_clip's standard batch-first ResidualAttentionBlock; "
                              f"{model} uses another block")
        if recipe.prompt_length < 0 or recipe.adapter_reduction < 1:
            raise ConfigError(f"prompt_length must be >= 0 and adapter_reduction >= 1, got "
                              f"{recipe.prompt_length} and {recipe.adapter_reduction}")
        if clip.context_length - 2 * recipe.prompt_length < 3:
            raise ConfigError(f"prompt_length {recipe.prompt_length} leaves no room for a caption in "
                              f"{clip.context_length} tokens; use at most {(clip.context_length - 3) // 2}")

    @torch.no_grad()
    def _init_text_prompts(self, phrase: str) -> None:
        """Layer-1 text prompts start as the token embeddings of ``phrase`` (the rest stay random)."""
        ids = self.tokenizer([phrase])[0]
        words = ids[1:int((ids == self.eos_id).nonzero()[0])][: self.prompts.text.shape[1]]
        self.prompts.text[0, : len(words)] = self.clip.token_embedding(words).to(self.prompts.text.dtype)

    # --- inference -------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """CLIP tokens cut to the room the prompts leave, [EOS] kept (69 wide for 4 + 4 prompts)."""
        return self.tokenizer(captions, context_length=self.caption_room)

    def fit_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Any CLIP token rows (e.g. 77 wide) cut or zero-padded to the caption room, [EOS] kept."""
        extra = tokens.shape[1] - self.caption_room
        if extra < 0:
            return F.pad(tokens, (0, -extra))
        if extra == 0:
            return tokens
        cut = tokens[:, : self.caption_room].clone()
        too_long = (tokens == self.eos_id).int().argmax(dim=1) >= self.caption_room
        cut[too_long, -1] = self.eos_id
        return cut

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        x = clip_blocks.image_tokens(visual, images)
        keep = x.shape[1]  # [CLS] + patches
        x = visual.ln_pre(torch.cat([x, clip_blocks.batch_of(self.prompts.image_tokens(0), x)], dim=1))

        def layer_prompts(layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                return x
            return torch.cat([x[:, :keep], clip_blocks.batch_of(self.prompts.image_tokens(layer), x)], dim=1)

        x = clip_blocks.run_blocks(visual.transformer, x, before=layer_prompts,
                              run=_adapted(self.adapters["image"], self.recipe.image_adapter_scale))
        return clip_blocks.project_image(visual, clip_blocks.pool_image(visual, x[:, :keep]))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        clip, n = self.clip, self.prompts.tokens_per_layer
        tokens = self.fit_tokens(tokens)
        # [SOS], prompts, caption + [EOS] + padding: 1 + n + caption_room - 1 = context length.
        x = clip_blocks.text_tokens(clip, tokens, self.prompts.text_tokens(0))

        def layer_prompts(layer: int, x: torch.Tensor) -> torch.Tensor:
            if layer == 0:
                return x
            return torch.cat([x[:, :1], clip_blocks.batch_of(self.prompts.text_tokens(layer), x), x[:, 1 + n:]], dim=1)

        x = clip_blocks.run_blocks(clip.transformer, x, clip_blocks.text_attention_mask(clip, x.shape[1]),
                              before=layer_prompts, run=_adapted(self.adapters["text"], self.recipe.text_adapter_scale))
        return clip_blocks.project_text(clip, clip_blocks.pool_text(clip, x, tokens, offset=n))

    # --- training --------------------------------------------------------
    def forward(self, batch):
        image_feats = self.encode_image(batch["images"])
        text_feats = self.encode_text(batch["tokens"])
        sdm = sdm_loss(image_feats, text_feats, batch["person_ids"], self.recipe.temperature)
        return {"loss": sdm, "sdm": sdm}

    def stages(self):
        # CLIP (its logit scale included: the temperature is fixed) never trains.
        return [Stage("transfer", self.recipe, lambda name: name.startswith(TRAINABLE_PREFIXES))]

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        projections = [*self.prompts.text_to_image.parameters(), *self.prompts.image_to_text.parameters()]
        counts.update(
            prompts=self.prompts.text.numel() + self.prompts.image.numel(),
            projections=sum(p.numel() for p in projections),
            adapters=sum(p.numel() for p in self.adapters.parameters()),
        )
        return counts

    # --- checkpoints -----------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        if not self.backbone_config.pretrained:
            # A randomly initialised backbone has no reference to rebuild it from, so such a
            # checkpoint (tests, smoke runs) keeps it; load_method then restores it too.
            return self.state_dict()
        return super().checkpoint_state()
