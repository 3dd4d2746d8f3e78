"""CFine: CLIP-driven fine-grained text-image person re-identification (Yan et al., IEEE TIP 2023).

CFine fine-tunes CLIP's towers and adds fine-grained features built from the tokens each
tower finds most informative. Where the paper is vague, the official code
(``shuanglinyan/CFine``) decides; docs/methods.md lists where we still differ.

- Token selection. The last layer's head-averaged attention of the global token ranks
  the other tokens: the [CLS] row over the patches, the [EOS] row over the words (CLIP's
  text tower has no [CLS]; its global token is [EOS]). Group 1 = ranks 1..K, group 2 =
  ranks K+1..2K. Images: K = int(0.1 x (1 + patches)) as the official code (19 at
  384x128). Captions: K = int(0.2 x the caption's own words), at least 1; the official
  code takes 20 % of BERT's padded length of 100 (K = 20 for every caption, padding
  included), which CLIP's 77-token tower has no equivalent of. [SOS], [EOS] and padding
  are never candidates.
- MGF, multi-grained global features (kept at inference). For each group the sequence
  [global token; group tokens] goes through one block shared by both modalities:
  self-attention, cross-attention whose keys/values are all tokens of that modality
  (raw, padding masked), QuickGELU MLP; its first output is the group's feature. One
  BatchNorm neck per modality (bias fixed at 0) is applied to the global and both group
  features; inference concatenates the three, L2-normalised.
- CFR and FCD scores (training only), in scaled units, summed into a pair score that a
  triplet loss trains (see ``cfr_scores``, ``fcd_scores``, ``losses.cfine_triplet_loss``).
- Losses (official weights): CMPM on the three features x 1, 1, 0.1; CMPC x 1 each;
  0.2 x diversity of the two part features per modality; 10 x triplet.

The paper's text encoder is BERT-base; CLIP's own text tower is used here, so both towers
come from the same open_clip model. All tokens are taken after CLIP's final LayerNorm and
projection (the official code keeps the 768-wide ViT tokens to match BERT's width), so
both modalities share the embedding width.

Distributed training: CMPM sees the global batch (features gathered across workers);
BatchNorm statistics, CMPC, diversity and the CFR/FCD triplet are per worker. The
official code trains on one GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

from tpr_ray.errors import ConfigError
from tpr_ray.methods.losses import cfine_triplet_loss, cmpc_loss, cmpm_loss, diversity_loss
from tpr_ray.methods import clip_blocks
from tpr_ray.methods.base import Method, Recipe, Stage


@dataclass(frozen=True)
class CFineRecipe(Recipe):
    """The official recipe plus CFine's token-selection ratios, score scales and loss weights."""

    image_topk_ratio: float = 0.1  # K patches = int(ratio x (1 + patches))
    text_topk_ratio: float = 0.2  # K words = int(ratio x the caption's words)
    fcd_topk: int = 3  # FCD matches each token to the mean of its top-k tokens of the other side
    cfr_temperature: float = 0.07  # CFR similarities are cos / this
    fcd_temperature: float = 0.01  # FCD similarities are cos / this
    cmpm_global_weight: float = 1.0
    cmpm_group1_weight: float = 1.0
    cmpm_group2_weight: float = 0.1
    cmpc_weight: float = 1.0  # each of the three features
    diversity_weight: float = 0.2
    triplet_weight: float = 10.0
    triplet_margin: float = 0.2  # in the scaled units of the pair score
    text_weight_decay: float = 0.0  # official: Adam's default 0 for the text encoder
    new_module_weight_decay: float = 0.0  # ... and for MGF, necks and the CMPC classifier


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
    """K = max(1, int(ratio x length)); the tiny epsilon keeps e.g. 0.2 x 15 from flooring to 2."""
    return torch.clamp(torch.floor(length.double() * ratio + 1e-9), min=1).long()


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
    """Groups of patch indices (0 = first patch) from the [CLS] row over the patches;
    K counts the [CLS] token in the length, as the official code does."""
    batch, n = cls_attention.shape
    k = topk_count(torch.full((batch,), n + 1, device=cls_attention.device), ratio)
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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the valid entries of the last dim (0 where none is valid)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)


def _scaled_softmax_pool(cosines: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_k softmax_k(s) * s with s = cos / t, over the valid entries of the last dim (0 if none)."""
    scaled = cosines / temperature
    weights = scaled.masked_fill(~mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return (weights * scaled.masked_fill(~mask, 0.0)).sum(dim=-1)


def cfr_scores(image_global: torch.Tensor, text_global: torch.Tensor, patches: torch.Tensor,
               patch_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
               temperature: float = 0.07) -> torch.Tensor:
    """Cross-grained feature refinement: (images, texts) matrix of pair scores, scaled units.

    Image global vs the caption's 2K selected words, and text global vs the image's 2K
    selected patches: each direction is sum softmax(s) * s over those tokens with
    s = cos / t; the two directions are averaged.
    """
    image_global, text_global = F.normalize(image_global.float(), dim=-1), F.normalize(text_global.float(), dim=-1)
    patches, words = F.normalize(patches.float(), dim=-1), F.normalize(words.float(), dim=-1)
    image_to_words = torch.einsum("ie,jwe->ijw", image_global, words)
    text_to_patches = torch.einsum("ipe,je->ijp", patches, text_global)
    word_mask = word_mask.unsqueeze(0).expand_as(image_to_words)
    patch_mask = patch_mask.unsqueeze(1).expand_as(text_to_patches)
    return 0.5 * (_scaled_softmax_pool(image_to_words, word_mask, temperature)
                  + _scaled_softmax_pool(text_to_patches, patch_mask, temperature))


def _mean_of_chosen(tokens: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, E), index/valid (B, M, k) -> (B, M, E): mean of the valid chosen tokens."""
    batch, m, k = index.shape
    chosen = tokens.gather(1, index.reshape(batch, m * k, 1).expand(-1, -1, tokens.shape[-1]))
    weights = valid.reshape(batch, m * k, 1).to(tokens.dtype)
    summed = (chosen * weights).reshape(batch, m, k, -1).sum(dim=2)
    return summed / weights.reshape(batch, m, k, 1).sum(dim=2).clamp_min(1.0)


def fcd_correspondences(patches: torch.Tensor, patch_mask: torch.Tensor, words: torch.Tensor,
                        word_mask: torch.Tensor, topk: int = 3):
    """Within each matched pair (b, b): for every patch slot the mean of its top-k words,
    for every word slot the mean of its top-k patches (raw features, as the official code).

    Words are ranked for a patch by cosine; patches are ranked for a word by that word's
    share of each patch's softmax over the words (the official code's ``Softmax(dim=2)``
    before both top-k's, which reorders the patches but not the words).
    Returns (words per patch (B, P, E), valid (B, P), patches per word (B, W, E), valid (B, W)).
    """
    cos = F.normalize(patches.float(), dim=-1) @ F.normalize(words.float(), dim=-1).transpose(1, 2)
    valid = patch_mask[:, :, None] & word_mask[:, None, :]
    kw, kp = min(topk, cos.shape[2]), min(topk, cos.shape[1])
    word_index = cos.masked_fill(~valid, float("-inf")).topk(kw, dim=2).indices  # (B, P, kw)
    word_ok = valid.gather(2, word_index)
    share = cos.masked_fill(~valid, float("-inf")).softmax(dim=2).nan_to_num(0.0)
    patch_index = share.masked_fill(~valid, float("-inf")).topk(kp, dim=1).indices  # (B, kp, W)
    patch_ok = valid.gather(1, patch_index)
    words_per_patch = _mean_of_chosen(words.float(), word_index, word_ok)
    patches_per_word = _mean_of_chosen(patches.float(), patch_index.transpose(1, 2), patch_ok.transpose(1, 2))
    return words_per_patch, word_ok.any(dim=2), patches_per_word, patch_ok.any(dim=1)


def fcd_scores(patches: torch.Tensor, patch_mask: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor,
               topk: int = 3, temperature: float = 0.01) -> torch.Tensor:
    """Fine-grained correspondence discovery on group 1: (images, texts) pair scores, scaled units.

    The correspondences come from the matched pairs only (``fcd_correspondences``) and are
    reused for every pair (i, j): patch slot p of image i against the words text j's own
    image chose for slot p, and image i's patches chosen for word slot w against word slot w
    of text j. Each side is a plain mean of cos / t over its slots; the sides are averaged.
    """
    words_per_patch, per_patch_ok, patches_per_word, per_word_ok = fcd_correspondences(
        patches, patch_mask, words, word_mask, topk)
    patch_unit, word_unit = F.normalize(patches.float(), dim=-1), F.normalize(words.float(), dim=-1)
    patch_side = torch.einsum("ipe,jpe->ijp", patch_unit, F.normalize(words_per_patch, dim=-1)) / temperature
    word_side = torch.einsum("iwe,jwe->ijw", F.normalize(patches_per_word, dim=-1), word_unit) / temperature
    patch_valid = patch_mask[:, None, :] & per_patch_ok[None, :, :]
    word_valid = per_word_ok[:, None, :] & word_mask[None, :, :]
    return 0.5 * (_masked_mean(patch_side, patch_valid) + _masked_mean(word_side, word_valid))


# --- modules ------------------------------------------------------------------------------


class MGFBlock(nn.Module):
    """The official block: self-attention over [global; group], cross-attention from that
    sequence to all tokens of the modality (raw keys/values), QuickGELU MLP; pre-norm."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_query = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, sequence: torch.Tensor, sequence_mask: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, width): the output at the first position of ``sequence``. Masks: True = valid
        (the official groups are always full; ours can have empty slots for short captions)."""
        h = self.ln_self(sequence)
        x = sequence + self.self_attn(h, h, h, key_padding_mask=~sequence_mask, need_weights=False)[0]
        padding = None if context_mask is None else ~context_mask
        x = x + self.cross_attn(self.ln_query(x), context, context, key_padding_mask=padding, need_weights=False)[0]
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
    # Official code: Adam (eps 1e-8); towers lr 1e-5 (image wd 4e-5, text wd 0), new modules and
    # the CMPC weights lr 1e-4, wd 0; 10 warm-up epochs from 1 %, then x0.1 at epochs 20, 25
    # and 35 (WarmupMultiStepLR); 50 epochs, batch 32; the schedule moves once per epoch.
    default_recipe = CFineRecipe(
        epochs=50, batch_size=32, lr=1e-5, new_module_lr_mult=10.0, bias_lr_mult=1.0,
        weight_decay=4e-5, bias_weight_decay=4e-5, optimizer="adam", adam_eps=1e-8,
        schedule="step", step_milestones=(20, 25, 35), step_gamma=0.1, warmup_epochs=10, warmup_factor=0.01,
    )
    new_module_prefixes = ("mgf.", "image_neck.", "text_neck.", "cmpc_classifier")

    def __init__(self, backbone, recipe, num_classes, clip=None):
        super().__init__(backbone, recipe, num_classes, clip)
        _check_towers(self.clip, backbone.model)
        width = self.clip_dim
        self.mgf = MGFBlock(width, heads=max(1, width // 64))
        # One neck per modality, shared by its global and both group features (BNNeck).
        self.image_neck = nn.BatchNorm1d(width)
        self.text_neck = nn.BatchNorm1d(width)
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
        x = visual.ln_pre(clip_blocks.image_tokens(visual, images))
        x, attention = clip_blocks.run_blocks(visual.transformer, x, last_attention=True)
        return clip_blocks.project_image(visual, visual.ln_post(x)), attention[:, 0, 1:]

    def _text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected tokens (batch, context, dim), [EOS] attention over all positions)."""
        clip = self.clip
        x = clip_blocks.text_tokens(clip, tokens)
        x, attention = clip_blocks.run_blocks(clip.transformer, x, clip_blocks.text_attention_mask(clip, x.shape[1]),
                                         last_attention=True)
        x = clip_blocks.project_text(clip, clip.ln_final(x))
        eos = clip_blocks.eos_positions(tokens)
        return x, attention[torch.arange(tokens.shape[0], device=tokens.device), eos]

    def _features(self, global_token, tokens, groups, context, context_mask, neck) -> list[torch.Tensor]:
        feats = [global_token]
        for index, mask in ((groups.first, groups.first_mask), (groups.second, groups.second_mask)):
            sequence = torch.cat([global_token.unsqueeze(1), _gather_tokens(tokens, index)], dim=1)
            sequence_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
            feats.append(self.mgf(sequence, sequence_mask, context, context_mask))
        return [neck(f) for f in feats]  # one call each, as the official code: per-feature batch statistics

    def image_side(self, images: torch.Tensor) -> Side:
        tokens, attention = self._image_tokens(images)
        groups = select_patches(attention, self.recipe.image_topk_ratio)
        patches = tokens[:, 1:]
        feats = self._features(tokens[:, 0], patches, groups, tokens, None, self.image_neck)
        return Side(tokens[:, 0], patches, groups, feats)

    def text_side(self, tokens: torch.Tensor) -> Side:
        feats_all, attention = self._text_tokens(tokens)
        groups = select_words(attention, tokens, self.recipe.text_topk_ratio)
        eos = clip_blocks.eos_positions(tokens)
        position = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1)
        real = position <= eos.view(-1, 1)  # [SOS] .. [EOS]; padding is not attended
        global_token = feats_all[torch.arange(tokens.shape[0], device=tokens.device), eos]
        feats = self._features(global_token, feats_all, groups, feats_all, real, self.text_neck)
        return Side(global_token, feats_all, groups, feats)

    # --- inference -----------------------------------------------------------
    def encode_image(self, images):
        return F.normalize(torch.cat(self.image_side(images).features, dim=-1).float(), dim=-1)

    def encode_text(self, tokens):
        return F.normalize(torch.cat(self.text_side(tokens).features, dim=-1).float(), dim=-1)

    # --- training ------------------------------------------------------------
    def pair_scores(self, image: Side, text: Side) -> torch.Tensor:
        """(images, texts) pair scores CFR + FCD, summed in scaled units (training only)."""
        r = self.recipe
        g, t = image.groups, text.groups
        patches_2k = _gather_tokens(image.tokens, torch.cat([g.first, g.second], dim=1))
        words_2k = _gather_tokens(text.tokens, torch.cat([t.first, t.second], dim=1))
        cfr = cfr_scores(image.global_token, text.global_token,
                         patches_2k, torch.cat([g.first_mask, g.second_mask], dim=1),
                         words_2k, torch.cat([t.first_mask, t.second_mask], dim=1), r.cfr_temperature)
        fcd = fcd_scores(_gather_tokens(image.tokens, g.first), g.first_mask,
                         _gather_tokens(text.tokens, t.first), t.first_mask, r.fcd_topk, r.fcd_temperature)
        return cfr + fcd

    def forward(self, batch):
        r = self.recipe
        image, text = self.image_side(batch["images"]), self.text_side(batch["tokens"])
        pids, labels = batch["person_ids"], batch["labels"]
        cmpm = cmpc = 0.0
        weights = (r.cmpm_global_weight, r.cmpm_group1_weight, r.cmpm_group2_weight)
        for weight, img, txt in zip(weights, image.features, text.features):
            cmpm = cmpm + weight * cmpm_loss(img, txt, pids)
            cmpc = cmpc + cmpc_loss(img, txt, labels, self.cmpc_classifier)
        diversity = (diversity_loss(torch.stack(image.features[1:], dim=1))
                     + diversity_loss(torch.stack(text.features[1:], dim=1)))
        triplet = cfine_triplet_loss(self.pair_scores(image, text), pids, r.triplet_margin)
        loss = cmpm + r.cmpc_weight * cmpc + r.diversity_weight * diversity + r.triplet_weight * triplet
        return {"loss": loss, "cmpm": cmpm, "cmpc": cmpc, "diversity": diversity, "triplet": triplet}

    def lr_and_weight_decay(self, name: str, recipe: CFineRecipe) -> tuple[float, float]:
        """The official three groups: new modules (and CMPC), the image tower, the text tower."""
        if name.startswith(self.new_module_prefixes):
            return recipe.lr * recipe.new_module_lr_mult, recipe.new_module_weight_decay
        if name.startswith("clip.visual."):
            return recipe.lr, recipe.weight_decay
        return recipe.lr, recipe.text_weight_decay

    def stages(self):
        # CLIP's logit scale is unused; the necks' BatchNorm shifts stay at 0 (BNNeck, as the original).
        def trainable(name: str) -> bool:
            neck_bias = name in ("image_neck.bias", "text_neck.bias")
            return name != "clip.logit_scale" and not neck_bias

        return [Stage("finetune", self.recipe, trainable)]
