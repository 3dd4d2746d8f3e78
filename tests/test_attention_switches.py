"""Fused attention and gradient checkpointing change speed and memory, never the numbers."""

import pytest
import torch

from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.methods import available, get_method
from tests.conftest import TINY

CAPTIONS = ["a man in a red coat with a black backpack", "a woman in a green dress", "a man in a red coat", "a girl"]


def _build(name):
    torch.manual_seed(0)
    cls = get_method(name)
    method = cls(BackboneConfig(**TINY, image_size=(64, 32)), cls.default_recipe, num_classes=3)
    method.set_stage(method.stages()[0])
    return method.train()


def _batch(method):
    torch.manual_seed(1)
    return {"images": torch.randn(4, 3, 64, 32), "tokens": method.tokenize(CAPTIONS),
            "person_ids": torch.tensor([0, 1, 0, 2]), "labels": torch.tensor([0, 1, 0, 2])}


def _loss_and_grads(method, batch):
    """(loss, gradients, how often the first block of each tower started: its ln_1 runs first)."""
    calls = []
    first = [method.clip.transformer.resblocks[0], method.clip.visual.transformer.resblocks[0]]
    hooks = [block.ln_1.register_forward_pre_hook(lambda *_: calls.append(1)) for block in first]
    method.zero_grad(set_to_none=True)
    try:
        loss = method(batch)["loss"]
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("name", available())
def test_gradient_checkpointing_keeps_loss_and_gradients(name):
    method = _build(name)
    batch = _batch(method)
    state = {k: v.clone() for k, v in method.state_dict().items()}  # BatchNorm statistics move in train mode
    loss, grads, runs = _loss_and_grads(method, batch)
    method.load_state_dict(state)
    method.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt, runs_ckpt = _loss_and_grads(method, batch)
    assert runs_ckpt == 2 * runs  # each block ran again in the backward pass: checkpointing is on
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", available())
def test_every_block_uses_fused_attention_except_where_weights_are_read(name):
    method = _build(name)
    batch = _batch(method)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        method(batch)["loss"].backward()
    fused = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    blocks = len(method.clip.transformer.resblocks) + len(method.clip.visual.transformer.resblocks)
    if name == "cfine":  # the last block of each tower returns its weights; MGF: 2 attentions x 2 groups x 2 sides
        assert fused == blocks - 2 + 8
    else:
        assert fused == blocks
