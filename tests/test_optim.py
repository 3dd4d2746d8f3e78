"""Optimizer fast paths: fused Adam only where its kernel applies, gradient checkpointing that
changes memory, not results. CPU only; the CUDA case is checked through the decision logic."""

import types

import pytest
import torch

import tpr_ray.training.optim as optim
from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.methods import get_method
from tpr_ray.training.config import TrainConfig
from tpr_ray.training.loop import build_method
from tests.helpers import TINY


def _param(device: str, floating: bool = True):
    return types.SimpleNamespace(device=torch.device(device), is_floating_point=lambda: floating)


def test_fused_adam_only_when_every_parameter_is_a_floating_cuda_tensor():
    assert optim.fused_adam_possible([_param("cuda"), _param("cuda")])
    assert not optim.fused_adam_possible([_param("cuda"), _param("cpu")])
    assert not optim.fused_adam_possible([_param("cuda", floating=False)])
    assert not optim.fused_adam_possible([_param("cpu")])
    assert not optim.fused_adam_possible([])


def _baseline():
    cls = get_method("baseline")
    method = cls(BackboneConfig(**TINY), cls.default_recipe, num_classes=5)
    (stage,) = method.stages()
    method.set_stage(stage)
    return method, stage


def test_build_optimizer_asks_for_the_fused_kernel_on_gpu_only(monkeypatch):
    method, stage = _baseline()
    on_cpu = optim.build_optimizer(method, stage)
    assert isinstance(on_cpu, torch.optim.Adam) and not on_cpu.defaults["fused"]
    seen = []
    monkeypatch.setattr(optim, "fused_adam_possible", lambda params: seen.append(list(params)) or True)
    fused = optim.build_optimizer(method, stage)  # torch also has a CPU fused kernel, so this builds here
    assert fused.defaults["fused"] is True
    assert len(seen[0]) == sum(p.requires_grad for p in method.parameters())
    assert fused.param_groups[0]["lr"] == on_cpu.param_groups[0]["lr"]  # the groups are unchanged


def test_gradient_checkpointing_keeps_loss_and_gradients(cuhk_small):
    torch.manual_seed(0)
    batch = {"images": torch.randn(4, 3, 64, 32), "person_ids": torch.tensor([1, 1, 2, 3]),
             "labels": torch.tensor([0, 0, 1, 2])}
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        cfg = TrainConfig(method="baseline", data=cuhk_small, out="unused", **TINY, image_size=(64, 32),
                          grad_checkpointing=checkpointing)
        method = build_method(cfg, num_classes=5).train()
        assert method.clip.visual.transformer.grad_checkpointing is checkpointing
        tokens = method.tokenize(["a man in a red coat", "red coat, black bag", "a woman", "blue shirt"])
        losses = method({**batch, "tokens": tokens})
        losses["loss"].backward()
        results.append((float(losses["loss"].detach()), {n: p.grad.clone() for n, p in method.named_parameters()
                                                if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_cfine_lr_follows_the_official_warmup_multistep_schedule():
    """CFine's WarmupMultiStepLR: 10 warm-up epochs from 1 %, then x0.1 at epochs 20, 25, 35
    (absolute epochs), stepped once per epoch; hand-computed factors."""
    from tpr_ray.methods import get_method
    from tpr_ray.training.optim import build_scheduler

    recipe = get_method("cfine").default_recipe
    assert recipe.step_milestones == (20, 25, 35)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=7)
    factors = []
    for _ in range(50):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = {0: 0.01, 5: 0.01 * 0.5 + 0.5, 10: 1.0, 19: 1.0, 20: 0.1, 24: 0.1, 25: 0.01, 34: 0.01, 35: 0.001, 49: 0.001}
    for epoch, factor in expected.items():
        assert factors[epoch] == pytest.approx(factor), epoch


def test_milestones_come_from_the_command_line_and_json():
    from tpr_ray.errors import ConfigError
    from tpr_ray.methods import get_method

    recipe = get_method("baseline").default_recipe
    assert recipe.override(step_milestones="20,25,35").step_milestones == (20, 25, 35)
    assert recipe.override(step_milestones=[3, 4]).step_milestones == (3, 4)
    with pytest.raises(ConfigError, match="step_milestones"):
        recipe.override(step_milestones="20,x")
