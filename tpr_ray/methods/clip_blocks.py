"""The CLIP tower plumbing every method shares, written once.

open_clip's ``encode_image`` / ``encode_text`` run a tower end to end. Methods that add
prompts, adapters or read attention need the steps in between, so they are here as
small functions over an open_clip ``CLIP`` (ViT image tower, CLIP text tower):

- ``image_tokens``: patches + [CLS] + positions (before ``ln_pre``, so prompts can join);
- ``text_tokens``: token embeddings with optional prompts after [SOS], + positions;
- ``run_blocks``: a tower's residual blocks, with a per-layer hook (replace prompt tokens,
  run a block differently), optionally the last block's head-averaged attention, and
  open_clip's gradient-checkpointing switch (``clip.set_grad_checkpointing()``) honoured;
- ``pool_image`` / ``pool_text``: [CLS] (open_clip's own pooling) / [EOS] at an offset;
- ``project_image`` / ``project_text``: the towers' final projections.

``encode_image`` / ``encode_text`` compose them and equal open_clip's own encoders.

Attention runs through open_clip's blocks, which call ``nn.MultiheadAttention`` with
``need_weights=False``: PyTorch then uses its fused ``scaled_dot_product_attention``. Only
a block asked for its attention weights (CFine's last layer) takes the unfused path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# hook(layer index, block, tokens, attention mask) -> tokens after that layer
BlockRunner = Callable[[int, nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# hook(layer index, tokens) -> tokens entering that layer
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


def batch_of(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, width) learned tokens repeated for every sample of ``like`` (batch, ., width)."""
    return tokens.to(like.dtype).unsqueeze(0).expand(like.shape[0], -1, -1)


def image_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(batch, 1 + patches, width): [CLS] and patch embeddings with positions, before ``ln_pre``."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.patch_dropout(x)


def text_tokens(clip: nn.Module, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, length, width): token embeddings, ``prompts`` (n, width) right after [SOS], + positions."""
    x = clip.token_embedding(tokens).to(clip.transformer.get_cast_dtype())
    if prompts is not None and prompts.shape[0]:
        x = torch.cat([x[:, :1], batch_of(prompts, x), x[:, 1:]], dim=1)
    return x + clip.positional_embedding[: x.shape[1]].to(x.dtype)


def text_attention_mask(clip: nn.Module, length: int) -> torch.Tensor | None:
    return None if clip.attn_mask is None else clip.attn_mask[:length, :length]


def _default_block(layer: int, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return block(x, attn_mask=mask)


def attention_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None):
    """An open_clip ``ResidualAttentionBlock`` that also returns its head-averaged attention."""
    h = block.ln_1(x)
    out, attention = block.attn(h, h, h, need_weights=True, average_attn_weights=True,
                                attn_mask=None if mask is None else mask.to(h.dtype))
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), attention


def run_blocks(transformer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
               before: LayerHook | None = None, run: BlockRunner | None = None, last_attention: bool = False):
    """Run an open_clip ``Transformer``'s blocks; ``before`` may change the tokens entering each
    layer and ``run`` replaces how a block is applied. With ``last_attention`` returns
    ``(x, attention)``, the last block's (batch, tokens, tokens) head-averaged attention;
    else ``x``. With the transformer's ``grad_checkpointing`` on, each block's activations
    are recomputed in the backward pass instead of stored (same values, less memory)."""
    run = run or _default_block
    blocks = transformer.resblocks
    recompute = getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
    attention = None
    for layer, block in enumerate(blocks):
        if before is not None:
            x = before(layer, x)
        if last_attention and layer == len(blocks) - 1:
            x, attention = attention_block(block, x, attn_mask)
        elif recompute:
            x = checkpoint(run, layer, block, x, attn_mask, use_reentrant=False)
        else:
            x = run(layer, block, x, attn_mask)
    return (x, attention) if last_attention else x


def eos_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Index of [EOS] in each row: the largest id of CLIP's vocabulary (open_clip's own rule)."""
    return tokens.argmax(dim=-1)


def pool_image(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The image tower's pooled feature (open_clip's ``_pool``: ``ln_post`` and [CLS] for CLIP)."""
    pooled, _ = visual._pool(x)
    return pooled


def project_image(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ visual.proj if visual.proj is not None else x


def pool_text(clip: nn.Module, x: torch.Tensor, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``ln_final`` then the [EOS] output; ``offset`` tokens (prompts) sit before the caption."""
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0], device=x.device), eos_positions(tokens) + offset]


def project_text(clip: nn.Module, x: torch.Tensor) -> torch.Tensor:
    projection = clip.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def encode_image(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    visual = clip.visual
    x = run_blocks(visual.transformer, visual.ln_pre(image_tokens(visual, images)))
    return project_image(visual, pool_image(visual, x))


def encode_text(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    x = text_tokens(clip, tokens)
    x = run_blocks(clip.transformer, x, text_attention_mask(clip, x.shape[1]))
    return project_text(clip, pool_text(clip, x, tokens))
