"""CFine: CLIP-driven fine-grained text-image person re-identification (Yan et al., IEEE TIP 2023).

CFine keeps CLIP's two towers (fully fine-tuned) and adds fine-grained features built
from the tokens each tower finds most informative:

- Token selection. The last layer's attention of the global token ranks the other
  tokens: the [CLS] row over the patches of an image, the [EOS] row over the words of a
  caption (CLIP's text tower has no [CLS]; its global token is [EOS]). Group 1 is ranks
  1..K, group 2 ranks K+1..2K, with K = 10 % of the patches and 20 % of each caption's
  words ([SOS], [EOS] and padding are never candidates).
- MGF, multi-grained global features (kept at inference). For each group the sequence
  [global token; group tokens] goes through one block shared by both modalities
  (self-attention, cross-attention to every token of the same modality, MLP); its first
  output is the group's feature. Global + 2 group features, each through its own
  BatchNorm neck, are concatenated and L2-normalised: the retrieval feature has 3 x the
  CLIP embedding width.
- CFR and FCD scores (training only) match an image and a caption at token level, and a
  hardest-negative triplet loss on their average trains the token features.

The paper's text encoder is BERT-base; here CLIP's own text tower is used, so both towers
come from the same open_clip model. All tokens are taken after CLIP's final LayerNorm and
projection, so both modalities share the embedding width before MGF, CFR and FCD.

Choices where the paper leaves room (the recipe fields name each knob):
- Losses: per feature, (CMPM + CMPC) x 1 (global), 1 (group 1), 0.1 (group 2); one
  norm-softmax CMPC classifier for all features and both modalities. The official code
  puts the 0.1 on CMPM only. Diversity: mean squared cosine between the group-1 and
  group-2 features of each sample (after their necks), image and text added.
- Scores stay in cosine units: the temperatures only set how sharply softmax weights pool
  token cosines (CFR over the 2K selected tokens at 0.07, FCD over the group-1 tokens at
  0.01), so the triplet margin 0.2 is a cosine margin. The triplet hinge is averaged over
  the anchors of each direction.
- Each of the six features has its own BatchNorm neck, bias fixed at 0 (BNNeck).
- Distributed training: CMPM sees the global batch (features gathered across workers);
  BatchNorm statistics, CMPC, diversity and the CFR/FCD triplet are per worker (its local
  batch). SyncBatchNorm would make the necks global too.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from tpr_ray.errors import ConfigError
from tpr_ray.losses import cmpc_loss, cmpm_loss, diversity_loss, hardest_negative_triplet_loss
from tpr_ray.methods import towers
from tpr_ray.methods.base import Method, Recipe, Stage


@dataclass(frozen=True)
class CFineRecipe(Recipe):
    """The recipe plus CFine's token-selection ratios, score temperatures and loss weights."""

    image_topk_ratio: float = 0.1  # K patches = this share of the patch count
    text_topk_ratio: float = 0.2  # K words = this share of each caption's words
    fcd_topk: int = 3  # FCD matches each token to the mean of its top-k tokens of the other side
    cfr_temperature: float = 0.07
    fcd_temperature: float = 0.01
    cmpc_weight: float = 1.0
    global_weight: float = 1.0  # CMPM + CMPC weight of the global feature
    group1_weight: float = 1.0  # ... of the group-1 feature (ranks 1..K)
    group2_weight: float = 0.1  # ... of the group-2 feature (ranks K+1..2K)
    diversity_weight: float = 0.2
    triplet_weight: float = 10.0
    triplet_margin: float = 0.2


# --- token selection (pure) -------------------------------------------------------------


class TokenGroups(NamedTuple):
    """Indices of the two groups of selected tokens, (batch, K) each, with validity masks.

    Slot r of ``first`` holds the rank-(r+1) token, slot r of ``second`` the rank-(K+r+1)
    token; a slot is invalid where the sample has fewer candidates (or a smaller K).
    """

    first: torch.Tensor
    first_mask: torch.Tensor
    second: torch.Tensor
    second_mask: torch.Tensor


def topk_count(length: torch.Tensor, ratio: float) -> torch.Tensor:
    """K = max(1, round(ratio x length)), rounding half to even like Python's ``round``."""
    return torch.clamp(torch.round(length.double() * ratio), min=1).long()


def select_groups(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> TokenGroups:
    """Rank the candidate tokens of each row by score and cut the two groups.

    ``scores`` (batch, tokens), ``candidates`` (batch, tokens) bool, ``k`` (batch,) the
    group size of each row. Ties keep the earlier position first.
    """
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    n_candidates = candidates.sum(dim=1, keepdim=True)
    k = k.view(-1, 1)
    rank = torch.arange(int(k.max()), device=scores.device).view(1, -1)
    first = order[:, : rank.shape[1]]
    second_rank = k + rank
    second = order.gather(1, second_rank.clamp(max=order.shape[1] - 1))
    return TokenGroups(first, (rank < k) & (rank < n_candidates), second, (rank < k) & (second_rank < n_candidates))


def select_patches(cls_attention: torch.Tensor, ratio: float) -> TokenGroups:
    """Groups of patch indices (0 = first patch) from the [CLS] row over the patches."""
    batch, n = cls_attention.shape
    k = topk_count(torch.full((batch,), n, device=cls_attention.device), ratio)
    return select_groups(cls_attention, torch.ones_like(cls_attention, dtype=torch.bool), k)


def word_candidates(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions strictly between [SOS] and [EOS], the [EOS] position) of CLIP token ids.

    [EOS] has the largest id of CLIP's vocabulary (open_clip pools the text the same way).
    """
    eos = tokens.argmax(dim=-1)
    position = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1)
    return (position > 0) & (position < eos.view(-1, 1)), eos


def select_words(eos_attention: torch.Tensor, tokens: torch.Tensor, ratio: float) -> TokenGroups:
    """Groups of word positions from the [EOS] row; K follows each caption's word count."""
    candidates, _ = word_candidates(tokens)
    return select_groups(eos_attention, candidates, topk_count(candidates.sum(dim=1), ratio))


# --- CFR and FCD scores (pure; training only) ---------------------------------------------


def _softmax_pool(values: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_k softmax_k(values / t) * values over the valid entries of the last dim (0 if none)."""
    logits = (values / temperature).masked_fill(~mask, -1e9)
    return (logits.softmax(dim=-1) * values.masked_fill(~mask, 0.0)).sum(dim=-1)


def _cosine_to_topk_mean(sims: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, k: int) -> torch.Tensor:
    """Cosine between each query token and the mean of its k most similar valid candidates.

    ``sims`` (..., queries, candidates) are cosines of unit vectors, ``gram`` (...,
    candidates, candidates) the candidates' own cosines, so cos(q, sum of selected) =
    sum(selected sims) / sqrt(selected' gram selected) needs no gather of the features.
    """
    k = min(k, sims.shape[-1])
    top = sims.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices
    chosen = torch.zeros_like(sims).scatter(-1, top, 1.0) * mask
    numerator = (chosen * sims).sum(dim=-1)
    squared_norm = ((chosen @ gram) * chosen).sum(dim=-1)
    return numerator / squared_norm.clamp_min(1e-12).sqrt()


def cfr_scores(image_global: torch.Tensor, text_global: torch.Tensor, patches: torch.Tensor,
               patch_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
               temperature: float = 0.07) -> torch.Tensor:
    """Cross-grained feature refinement: (images, texts) matrix of pair scores.

    Image global vs the caption's selected words, and text global vs the image's selected
    patches, each a softmax(cos / t)-weighted mean of the cosines; the two are averaged.
    """
    image_global, text_global = F.normalize(image_global.float(), dim=-1), F.normalize(text_global.float(), dim=-1)
    patches, words = F.normalize(patches.float(), dim=-1), F.normalize(words.float(), dim=-1)
    image_to_words = torch.einsum("ie,jwe->ijw", image_global, words)
    text_to_patches = torch.einsum("ipe,je->ijp", patches, text_global)
    return 0.5 * (_softmax_pool(image_to_words, word_mask.unsqueeze(0).expand_as(image_to_words), temperature)
                  + _softmax_pool(text_to_patches, patch_mask.unsqueeze(1).expand_as(text_to_patches), temperature))


def fcd_scores(patches: torch.Tensor, patch_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
               topk: int = 3, temperature: float = 0.01) -> torch.Tensor:
    """Fine-grained correspondence discovery on group 1: (images, texts) matrix of pair scores.

    Each patch is compared with the mean of its top-k words of the caption, each word with
    the mean of its top-k patches of the image; each side pools its token cosines with
    softmax(cos / t) weights, and the two sides are averaged.
    """
    patches, words = F.normalize(patches.float(), dim=-1), F.normalize(words.float(), dim=-1)
    sims = torch.einsum("ipe,jwe->ijpw", patches, words)  # (images, texts, patches, words)
    pair_mask = patch_mask[:, None, :, None] & word_mask[None, :, None, :]
    word_gram = (words @ words.transpose(1, 2)).unsqueeze(0)  # (1, texts, words, words)
    patch_gram = (patches @ patches.transpose(1, 2)).unsqueeze(1)  # (images, 1, patches, patches)
    patch_side = _cosine_to_topk_mean(sims, pair_mask, word_gram, topk)  # (images, texts, patches)
    word_side = _cosine_to_topk_mean(sims.transpose(2, 3), pair_mask.transpose(2, 3), patch_gram, topk)
    patch_valid = patch_mask[:, None, :].expand_as(patch_side)
    word_valid = word_mask[None, :, :].expand_as(word_side)
    return 0.5 * (_softmax_pool(patch_side, patch_valid, temperature)
                  + _softmax_pool(word_side, word_valid, temperature))


# --- modules ------------------------------------------------------------------------------


class MGFBlock(nn.Module):
    """Self-attention over [global; group], cross-attention to all tokens, MLP (pre-norm)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_query = nn.LayerNorm(width)
        self.ln_context = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, sequence: torch.Tensor, sequence_mask: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, width): the output at the first position of ``sequence``. Masks: True = valid."""
        h = self.ln_self(sequence)
        x = sequence + self.self_attn(h, h, h, key_padding_mask=~sequence_mask, need_weights=False)[0]
        kv = self.ln_context(context)
        padding = None if context_mask is None else ~context_mask
        x = x + self.cross_attn(self.ln_query(x), kv, kv, key_padding_mask=padding, need_weights=False)[0]
        x = x + self.mlp(self.ln_mlp(x))
        return x[:, 0]


class Side(NamedTuple):
    """One modality of a batch: projected tokens, the selected groups and the three features."""

    global_token: torch.Tensor  # (batch, dim) projected [CLS] / [EOS], before its neck
    tokens: torch.Tensor  # (batch, length, dim) tokens the groups index into
    groups: TokenGroups
    features: list[torch.Tensor]  # [global, group 1, group 2], each after its BatchNorm neck


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _check_towers(clip: nn.Module, model: str) -> None:
    """CFine reads the towers' tokens and attention itself; refuse towers it does not know."""
    visual = getattr(clip, "visual", None)
    problems = []
    if visual is None or not hasattr(visual, "transformer") or not hasattr(clip, "token_embedding"):
        problems.append("it is not an open_clip CLIP with ViT image and transformer text towers")
    else:
        for tower, transformer in (("image", visual.transformer), ("text", clip.transformer)):
            if not all(isinstance(b, ResidualAttentionBlock) for b in transformer.resblocks):
                problems.append(f"the {tower} tower does not use ResidualAttentionBlock")
            if not getattr(transformer, "batch_first", True):
                problems.append(f"the {tower} tower is not batch-first")
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            problems.append("the image tower does not pool its [CLS] token")
        if getattr(clip, "text_pool_type", None) != "argmax":
            problems.append("the text tower does not pool its [EOS] token")
    if problems:
        raise ConfigError(f"CFine cannot use open_clip model {model!r}: {'; '.join(problems)}. "
                          f"Use a CLIP ViT model such as ViT-B-16 (or tpr-tiny for tests).")


class CFine(Method):
    """CFine (TIP 2023): CLIP towers, token selection, shared MGF block, BN necks; CFR/FCD in training."""

    name = "cfine"
    # Official code: Adam, backbone lr 1e-5 and new modules x10, 10 warm-up epochs from 1 %,
    # step decay; 50 epochs, batch 32. The warm-up protects the pretrained towers from the
    # large early gradients of the randomly initialised MGF block, necks and classifier.
    default_recipe = CFineRecipe(
        epochs=50, batch_size=32, lr=1e-5, new_module_lr_mult=10.0, bias_lr_mult=1.0,
        weight_decay=4e-5, bias_weight_decay=0.0, optimizer="adam", adam_eps=1e-8,
        schedule="step", step_decay_epochs=10, step_gamma=0.1, warmup_epochs=10, warmup_factor=0.01,
    )
    new_module_prefixes = ("mgf.", "image_necks.", "text_necks.", "cmpc_classifier")

    def __init__(self, backbone, recipe, num_classes):
        super().__init__(backbone, recipe, num_classes)
        _check_towers(self.clip, backbone.model)
        width = self.clip_dim
        self.mgf = MGFBlock(width, heads=max(1, width // 64))
        self.image_necks = nn.ModuleList([nn.BatchNorm1d(width) for _ in range(3)])
        self.text_necks = nn.ModuleList([nn.BatchNorm1d(width) for _ in range(3)])
        self.cmpc_classifier = nn.Parameter(torch.empty(width, num_classes))
        nn.init.xavier_uniform_(self.cmpc_classifier)

    @property
    def clip_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    @property
    def embed_dim(self) -> int:
        return 3 * self.clip_dim

    # --- towers --------------------------------------------------------------
    def _image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected tokens (batch, 1 + patches, dim) with [CLS] first, [CLS] attention over patches)."""
        visual = self.clip.visual
        x = visual.ln_pre(towers.image_tokens(visual, images))
        x, attention = towers.run_blocks(visual.transformer.resblocks, x, last_attention=True)
        return towers.project_image(visual, visual.ln_post(x)), attention[:, 0, 1:]

    def _text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected tokens (batch, context, dim), [EOS] attention over all positions)."""
        clip = self.clip
        x = towers.text_tokens(clip, tokens)
        x, attention = towers.run_blocks(clip.transformer.resblocks, x, towers.text_attention_mask(clip, x.shape[1]),
                                         last_attention=True)
        x = towers.project_text(clip, clip.ln_final(x))
        eos = towers.eos_positions(tokens)
        return x, attention[torch.arange(tokens.shape[0], device=tokens.device), eos]

    def _features(self, global_token, tokens, groups, context, context_mask, necks) -> list[torch.Tensor]:
        feats = [global_token]
        for index, mask in ((groups.first, groups.first_mask), (groups.second, groups.second_mask)):
            sequence = torch.cat([global_token.unsqueeze(1), _gather_tokens(tokens, index)], dim=1)
            sequence_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
            feats.append(self.mgf(sequence, sequence_mask, context, context_mask))
        return [neck(f) for neck, f in zip(necks, feats)]

    def image_side(self, images: torch.Tensor) -> Side:
        tokens, attention = self._image_tokens(images)
        groups = select_patches(attention, self.recipe.image_topk_ratio)
        patches = tokens[:, 1:]
        feats = self._features(tokens[:, 0], patches, groups, tokens, None, self.image_necks)
        return Side(tokens[:, 0], patches, groups, feats)

    def text_side(self, tokens: torch.Tensor) -> Side:
        feats_all, attention = self._text_tokens(tokens)
        groups = select_words(attention, tokens, self.recipe.text_topk_ratio)
        eos = tokens.argmax(dim=-1)
        position = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1)
        real = position <= eos.view(-1, 1)  # [SOS] .. [EOS]; padding is not attended
        global_token = feats_all[torch.arange(tokens.shape[0], device=tokens.device), eos]
        feats = self._features(global_token, feats_all, groups, feats_all, real, self.text_necks)
        return Side(global_token, feats_all, groups, feats)

    # --- inference -----------------------------------------------------------
    def encode_image(self, images):
        return F.normalize(torch.cat(self.image_side(images).features, dim=-1).float(), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(torch.cat(self.text_side(tokens).features, dim=-1).float(), dim=-1)

    # --- training ------------------------------------------------------------
    def pair_scores(self, image: Side, text: Side) -> torch.Tensor:
        """(images, texts) CFR + FCD score matrix, averaged (training only)."""
        r = self.recipe
        g, t = image.groups, text.groups
        patches_2k = _gather_tokens(image.tokens, torch.cat([g.first, g.second], dim=1))
        words_2k = _gather_tokens(text.tokens, torch.cat([t.first, t.second], dim=1))
        cfr = cfr_scores(image.global_token, text.global_token,
                         patches_2k, torch.cat([g.first_mask, g.second_mask], dim=1),
                         words_2k, torch.cat([t.first_mask, t.second_mask], dim=1), r.cfr_temperature)
        fcd = fcd_scores(_gather_tokens(image.tokens, g.first), g.first_mask,
                         _gather_tokens(text.tokens, t.first), t.first_mask, r.fcd_topk, r.fcd_temperature)
        return 0.5 * (cfr + fcd)

    def forward(self, batch):
        r = self.recipe
        image, text = self.image_side(batch["images"]), self.text_side(batch["tokens"])
        pids, labels = batch["person_ids"], batch["labels"]
        cmpm = cmpc = 0.0
        for weight, img, txt in zip((r.global_weight, r.group1_weight, r.group2_weight), image.features, text.features):
            cmpm = cmpm + weight * cmpm_loss(img, txt, pids)
            cmpc = cmpc + weight * cmpc_loss(img, txt, labels, self.cmpc_classifier)
        diversity = (diversity_loss(torch.stack(image.features[1:], dim=1))
                     + diversity_loss(torch.stack(text.features[1:], dim=1)))
        triplet = hardest_negative_triplet_loss(self.pair_scores(image, text), pids, r.triplet_margin)
        loss = cmpm + r.cmpc_weight * cmpc + r.diversity_weight * diversity + r.triplet_weight * triplet
        return {"loss": loss, "cmpm": cmpm, "cmpc": cmpc, "diversity": diversity, "triplet": triplet}

    def stages(self):
        # CLIP's logit scale is unused; the necks' BatchNorm shifts stay at 0 (BNNeck, as the original).
        def trainable(name: str) -> bool:
            neck_bias = name.startswith(("image_necks.", "text_necks.")) and name.endswith(".bias")
            return name != "clip.logit_scale" and not neck_bias

        return [Stage("finetune", self.recipe, trainable)]
