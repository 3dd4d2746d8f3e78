import math
import os

import pytest
import torch

from tpr_ray.model.checkpoint import MODEL_FILE, load_method, read_config
from tpr_ray.errors import ConfigError
from tpr_ray.methods import Recipe, get_method
from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.training.config import TrainConfig
from tpr_ray.training.driver import train
from tpr_ray.training.optim import lr_factor
from tests.helpers import TINY


def test_lr_factor_warms_up_linearly_then_follows_cosine():
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.0)
    assert lr_factor(3, 0, 10, 0.1, "constant") == 1.0


def test_recipe_override_checks_names_and_types():
    r = Recipe().override(lr="0.5", epochs="3", augment="false")
    assert (r.lr, r.epochs, r.augment) == (0.5, 3, False)
    with pytest.raises(ConfigError, match="unknown recipe option 'lrr'"):
        Recipe().override(lrr=1)
    with pytest.raises(ConfigError, match="expects int"):
        Recipe().override(epochs="many")


def test_baseline_trains_everything_but_the_fixed_temperature_with_irra_multipliers():
    method = get_method("baseline")(BackboneConfig(**TINY), get_method("baseline").default_recipe, num_classes=5)
    (stage,) = method.stages()
    method.set_stage(stage)
    frozen = [n for n, p in method.named_parameters() if not p.requires_grad]
    assert frozen == ["clip.logit_scale"]
    groups = {g["name"]: g for g in method.param_groups(stage.recipe)}
    assert groups["classifier.weight"]["lr"] == pytest.approx(5e-5)
    assert groups["classifier.bias"]["lr"] == pytest.approx(5e-5)  # IRRA: x5 replaces the bias x2
    assert groups["classifier.bias"]["weight_decay"] == 0.0
    assert groups["clip.visual.conv1.weight"]["lr"] == pytest.approx(1e-5)
    assert groups["clip.visual.conv1.weight"]["weight_decay"] == pytest.approx(4e-5)


def _one_step(data, out, name, workers, batch):
    cfg = TrainConfig(method="baseline", data=data, out=out, name=name, **TINY, num_workers=workers,
                      cpus_per_worker=0.5, loader_workers=0, max_steps=1, seed=3,
                      overrides={"optimizer": "sgd", "lr": 0.5, "batch_size": batch, "augment": False,
                                 "warmup_factor": 1.0, "epochs": 1})
    return train(cfg)


@pytest.mark.slow
def test_two_workers_with_batch_b_equal_one_worker_with_batch_2b(ray_cluster, cuhk_small, tmp_path):
    """The SDM loss sees the global batch: same loss and same SGD update whatever the worker count."""
    one = _one_step(cuhk_small, str(tmp_path), "one", workers=1, batch=8)
    two = _one_step(cuhk_small, str(tmp_path), "two", workers=2, batch=4)
    loss_one = read_config(one.latest_checkpoint)["metrics"]["train_loss"]
    loss_two = read_config(two.latest_checkpoint)["metrics"]["train_loss"]
    assert loss_one == pytest.approx(loss_two, rel=1e-5)

    cls = get_method("baseline")
    torch.manual_seed(3)  # the workers seed with the run's seed before building the model
    num_classes = read_config(one.latest_checkpoint)["num_classes"]
    start = cls(BackboneConfig(**TINY), cls.default_recipe, num_classes).state_dict()
    after_one = torch.load(os.path.join(one.latest_checkpoint, MODEL_FILE), weights_only=True)
    after_two = torch.load(os.path.join(two.latest_checkpoint, MODEL_FILE), weights_only=True)
    moved = 0
    for key, w0 in start.items():
        if not torch.is_floating_point(w0):
            continue
        d1, d2 = after_one[key] - w0, after_two[key] - w0
        # float summation order differs between the runs; compare per tensor, relative to its size
        assert float((d1 - d2).norm()) <= 1e-5 * float(d1.norm()) + 1e-7, f"update of {key} differs"
        moved += int(d1.abs().max() > 0)
    assert moved > 0.9 * sum(torch.is_floating_point(w) for w in start.values())


@pytest.mark.slow
def test_stopped_run_resumes_from_its_latest_checkpoint(ray_cluster, cuhk_small, tmp_path):
    base = dict(method="baseline", data=cuhk_small, out=str(tmp_path), name="resume", **TINY, num_workers=1,
                loader_workers=0, overrides={"batch_size": 8, "epochs": 2, "lr": 1e-3, "warmup_epochs": 0})
    first = train(TrainConfig(**base, max_steps=3))  # stop mid-way through epoch 1
    assert read_config(first.latest_checkpoint)["global_step"] == 3
    with pytest.raises(ConfigError, match="--resume"):
        train(TrainConfig(**base))
    assert read_config(first.latest_checkpoint)["data_version"]  # recorded for the resume check
    with pytest.raises(ConfigError, match="recipe lr: the run has 0.001, this command 0.01"):
        train(TrainConfig(**{**base, "overrides": {**base["overrides"], "lr": 1e-2}}, resume=True))
    second = train(TrainConfig(**base, resume=True))
    final = read_config(second.latest_checkpoint)
    assert final["stage"] == 1 and final["epoch"] == 0  # past the last epoch of the only stage
    # epoch 1 was restarted from its beginning after step 3, so 3 extra steps were taken
    per_epoch = (final["global_step"] - 3) // 2
    assert final["global_step"] == 3 + 2 * per_epoch
    assert os.path.exists(os.path.join(tmp_path, "resume", "best.json"))
    from tests.test_tracking import read_scalars

    scalars = read_scalars(os.path.join(tmp_path, "resume", "tensorboard"))  # both invocations logged
    assert {"train/loss", "train/sdm", "train/id", "lr", "samples_per_s", "val/R1", "val/mAP"} <= set(scalars)
    assert [step for step, _ in scalars["val/R1"]] == [3, 3 + per_epoch, final["global_step"]]
    method, config = load_method(os.path.join(tmp_path, "resume"))
    assert config["checkpoint"] == second.best_checkpoint
    assert method.embed_dim == 64


def _lrs_seen(recipe, steps_per_epoch):
    """The lr of every optimizer step of a stage, driven the way the training loop drives it."""
    from types import SimpleNamespace

    from tpr_ray.training.optim import advance, build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(optimizer, SimpleNamespace(**recipe), steps_per_epoch)
    seen = []
    for _ in range(recipe["epochs"]):
        for _ in range(steps_per_epoch):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            advance(scheduler, SimpleNamespace(**recipe), "step")
        advance(scheduler, SimpleNamespace(**recipe), "epoch")
    return seen


SCHEDULE = {"epochs": 4, "warmup_epochs": 1, "warmup_factor": 0.1, "schedule": "cosine", "step_decay_epochs": 20,
            "step_gamma": 0.1}


def test_schedule_stepped_per_epoch_holds_the_lr_within_each_epoch():
    # warm-up epoch at 0.1, then cosine over the 3 remaining epochs: 1, (1 + cos(pi/3))/2, (1 + cos(2pi/3))/2
    per_epoch = [0.1, 1.0, 0.75, 0.25]
    seen = _lrs_seen({**SCHEDULE, "schedule_unit": "epoch"}, steps_per_epoch=3)
    assert seen == pytest.approx([lr for lr in per_epoch for _ in range(3)])


def test_schedule_stepped_per_iteration_warms_up_and_decays_within_epochs():
    seen = _lrs_seen({**SCHEDULE, "schedule_unit": "step"}, steps_per_epoch=3)
    warmup = [0.1, 0.1 * 2 / 3 + 1 / 3, 0.1 / 3 + 2 / 3]
    cosine = [0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(9)]
    assert seen == pytest.approx(warmup + cosine)
    assert _lrs_seen(SCHEDULE, 3) == seen  # a recipe without the field keeps the per-iteration schedule


def test_unknown_schedule_unit_is_a_config_error():
    with pytest.raises(ConfigError, match="schedule_unit 'batch'"):
        _lrs_seen({**SCHEDULE, "schedule_unit": "batch"}, 3)


def test_worker_progress_lines_name_their_run_and_give_an_eta(capsys, monkeypatch):
    import tpr_ray.training.loop as train

    monkeypatch.setattr(train, "_RUN_LABEL", "baseline-cuhk")
    train.log("baseline epoch 1/20 step 5/10")
    assert capsys.readouterr().out == "[tpr-ray] baseline-cuhk: baseline epoch 1/20 step 5/10\n"
    assert (train.format_eta(59.6), train.format_eta(61), train.format_eta(3725)) == ("1:00", "1:01", "1:02:05")


def test_a_method_builds_its_own_inputs_through_prepare_batch():
    """The training step hands the loader's batch to ``Method.prepare_batch`` (IRRA's MLM masks
    its tokens there); ``forward`` receives what it returns, the base tokens included."""
    from types import SimpleNamespace

    from tpr_ray.methods.baseline import Baseline
    from tpr_ray.training.loop import train_step

    seen = []

    class Masking(Baseline):
        def prepare_batch(self, batch, device):
            inputs = super().prepare_batch(batch, device)
            inputs["mlm_tokens"] = inputs["tokens"].clone()
            inputs["mlm_tokens"][:, 1] = 0
            return inputs

        def forward(self, batch):
            seen.append(batch)
            return super().forward(batch)

    torch.manual_seed(0)
    method = Masking(BackboneConfig("tpr-tiny", None, (32, 16)), Baseline.default_recipe, num_classes=3)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)
    run = SimpleNamespace(model=method, optimizer=optimizer, recipe=method.recipe,
                          scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    batch = {"image": torch.rand(2, 3, 32, 16), "caption": ["a man in red", "a woman in blue"],
             "person_id": torch.tensor([1, 2]), "label": torch.tensor([0, 1])}
    losses = train_step(method, run, batch, torch.device("cpu"))
    assert torch.isfinite(losses["loss"])
    (inputs,) = seen
    assert torch.equal(inputs["tokens"], method.tokenize(batch["caption"]))
    assert inputs["mlm_tokens"][:, 1].eq(0).all() and not inputs["tokens"][:, 1].eq(0).any()
    assert torch.equal(inputs["labels"], batch["label"])
