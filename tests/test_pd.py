import dataclasses
import glob
import os

import pyarrow.compute as pc
import pytest
import torch

from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.model.checkpoint import MODEL_FILE, OPTIMIZER_FILE, load_method, read_config, save_checkpoint
from tpr_ray.data import load_manifest, selection_split
from tpr_ray.errors import ConfigError
from tpr_ray.methods import get_method
from tpr_ray.methods.pd import PD, PDRecipe, fit_tokens
from tpr_ray.training.config import TrainConfig
from tpr_ray.training.driver import train
from tpr_ray.training.inputs import evaluate_split
from tpr_ray.training.optim import build_optimizer
from tests.helpers import TINY

PROMPTS = ("text_prompts", "image_prompts")
CAPTION = "a woman in a red coat with a black backpack"
LONG_CAPTION = " ".join(["a tall man wearing a blue jacket and grey trousers"] * 12)  # > 77 tokens


def tiny_pd(num_classes=5, **overrides) -> PD:
    torch.manual_seed(0)
    return PD(BackboneConfig(**TINY), PD.default_recipe.override(**overrides), num_classes)


def tiny_batch(method: PD) -> dict:
    torch.manual_seed(1)
    return {
        "images": torch.randn(4, 3, 384, 128),
        "tokens": method.tokenize([CAPTION, "a man in a blue shirt", CAPTION + " and shoes", "a girl"]),
        "person_ids": torch.tensor([7, 9, 7, 9]),
        "labels": torch.tensor([0, 1, 0, 1]),
    }


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("clip.")}


def prompts(state: dict) -> dict:
    return {k: state[k] for k in PROMPTS}


def assert_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"{what} changed: {changed[:5]}"


# --- recipe and stages --------------------------------------------------------------

def test_recipe_options_round_trip_and_each_stage_gets_its_own_recipe():
    default = PD.default_recipe
    assert isinstance(default, PDRecipe)
    assert default.override(**default.to_dict()) == default  # how checkpoints rebuild it
    r = default.override(stage1_epochs="3", stage1_lr="0.05", n_text_prompts="6", text_prompt_init="", epochs="7")
    assert (r.stage1_epochs, r.stage1_lr, r.n_text_prompts, r.text_prompt_init, r.epochs) == (3, 0.05, 6, "", 7)
    with pytest.raises(ConfigError, match="unknown recipe option 'stage3_epochs'"):
        default.override(stage3_epochs=1)

    prompt_stage, finetune_stage = tiny_pd().stages()
    assert (prompt_stage.name, finetune_stage.name) == ("prompts", "finetune")
    s1 = prompt_stage.recipe
    assert (s1.epochs, s1.lr, s1.warmup_epochs, s1.id_loss_weight) == (10, 1e-3, 1, 0.0)
    # stage 2 is the baseline recipe, field for field
    baseline = get_method("baseline").default_recipe
    for f in dataclasses.fields(baseline):
        assert getattr(finetune_stage.recipe, f.name) == getattr(baseline, f.name), f.name


def test_prompt_lengths_are_checked():
    with pytest.raises(ConfigError, match="n_text_prompts must be between 0 and 75"):
        tiny_pd(n_text_prompts=76)
    with pytest.raises(ConfigError, match="text_prompt_init 'a photo of a' is 4 tokens"):
        tiny_pd(n_text_prompts=2)


def test_stage_1_trains_only_the_prompts_and_stage_2_everything_else_but_the_logit_scale():
    method = tiny_pd()
    total = sum(p.numel() for p in method.parameters())
    stage1, stage2 = method.stages()
    method.set_stage(stage1)
    assert [n for n, p in method.named_parameters() if p.requires_grad] == list(PROMPTS)
    assert method.parameter_counts() == {"total": total, "trainable": 4 * 64 + 8 * 64}
    groups = method.param_groups(stage1.recipe)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]  # the stage-1 lr as given, no multiplier
    method.set_stage(stage2)
    assert {n for n, p in method.named_parameters() if not p.requires_grad} == {"clip.logit_scale", *PROMPTS}
    assert method.parameter_counts()["trainable"] == total - 1 - 4 * 64 - 8 * 64


def test_trainable_counts_of_vit_b16_per_stage():
    # CUHK-PEDES has 11,003 training identities: the ID classifier is 512 x 11003 + 11003.
    method = PD(BackboneConfig("ViT-B-16", None), PD.default_recipe, num_classes=11003)
    stage1, stage2 = method.stages()
    method.set_stage(stage1)
    assert method.parameter_counts() == {"total": 155_270_396, "trainable": 4 * 512 + 8 * 768}
    method.set_stage(stage2)
    clip = sum(p.numel() for p in method.clip.parameters())
    assert clip == 149_617_665  # ViT-B/16 with the 24 x 8 + 1 position table of 384 x 128 inputs
    assert method.parameter_counts()["trainable"] == clip - 1 + 512 * 11003 + 11003 == 155_262_203


# --- encoders ----------------------------------------------------------------------

def test_without_prompts_the_encoders_are_exactly_clip():
    method = tiny_pd(n_text_prompts=0, n_image_prompts=0).eval()
    images = torch.randn(2, 3, 384, 128)
    tokens = method.tokenize([CAPTION, LONG_CAPTION])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        assert torch.equal(method.encode_image(images), method.clip.encode_image(images))
        assert torch.equal(method.encode_text(tokens), method.clip.encode_text(tokens))


def test_text_prompts_follow_sos_and_the_feature_is_the_shifted_eos():
    """Prompts equal to the embeddings of "a photo of a" must give exactly what CLIP gives for
    the caption with that phrase written in front, short or cut (then [EOS] ends it)."""
    method = tiny_pd(text_prompt_init="").eval()
    clip, tok = method.clip, method.tokenizer
    phrase = tok(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        method.text_prompts.copy_(clip.token_embedding(phrase))
        tokens = method.tokenize([CAPTION, LONG_CAPTION])
        assert tokens.shape == (2, 73)
        assert tokens[1, -1] == method.eos_id  # the cut caption keeps its [EOS]
        expected = clip.encode_text(tok(["a photo of a " + CAPTION, "a photo of a " + LONG_CAPTION]))
        torch.testing.assert_close(method.encode_text(tokens), expected, rtol=0, atol=1e-6)
        # CLIP's own 77-token rows are cut the same way, so any tokenisation works
        torch.testing.assert_close(method.encode_text(tok([CAPTION, LONG_CAPTION])), expected, rtol=0, atol=1e-6)
        before = method.encode_text(tokens)
        method.text_prompts[0] += 0.5
        assert not torch.allclose(method.encode_text(tokens), before)


def test_default_text_prompts_start_from_the_phrase_embeddings():
    method = tiny_pd(n_text_prompts=6)
    words = method.tokenizer(["a photo of a"])[0, 1:5]
    assert torch.equal(method.text_prompts[2:], method.clip.token_embedding(words).detach())


def test_fit_tokens_cuts_rows_and_ends_them_with_eos():
    eos = 9
    rows = torch.tensor([[1, 5, 9, 0, 0, 0], [1, 5, 6, 7, 8, 9]])
    assert torch.equal(fit_tokens(rows, 4, eos), torch.tensor([[1, 5, 9, 0], [1, 5, 6, 9]]))
    assert fit_tokens(rows, 6, eos) is rows


def test_image_prompts_join_the_patch_tokens_before_ln_pre():
    """Reference: CLIP's own image forward with the prompts appended at the input of ln_pre."""
    method = tiny_pd().eval()
    images = torch.randn(2, 3, 384, 128)
    visual = method.clip.visual

    def append_prompts(module, args):
        x = args[0]
        return (torch.cat([x, method.image_prompts.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1),)

    with torch.no_grad():
        ours = method.encode_image(images)
        handle = visual.ln_pre.register_forward_pre_hook(append_prompts)
        try:
            expected = method.clip.encode_image(images)
        finally:
            handle.remove()
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(ours, method.clip.encode_image(images))  # the prompts matter


# --- one optimisation step per stage ------------------------------------------------------

def test_a_step_of_stage_1_moves_only_prompts_and_a_step_of_stage_2_only_the_rest():
    method = tiny_pd()
    stage1, stage2 = method.stages()
    start = {k: v.clone() for k, v in method.state_dict().items()}

    method.set_stage(stage1)
    losses = method(tiny_batch(method))
    assert set(losses) == {"loss", "sdm"} and torch.equal(losses["loss"], losses["sdm"])  # SDM only
    optimizer = build_optimizer(method, stage1)
    losses["loss"].backward()
    optimizer.step()
    after1 = {k: v.clone() for k, v in method.state_dict().items()}
    assert all(not torch.equal(after1[k], start[k]) for k in PROMPTS)
    assert_identical({k: v for k, v in after1.items() if k not in PROMPTS},
                     {k: v for k, v in start.items() if k not in PROMPTS}, "a frozen weight")

    method.zero_grad(set_to_none=True)
    method.set_stage(stage2)
    losses = method(tiny_batch(method))
    torch.testing.assert_close(losses["loss"], losses["sdm"] + losses["id"])
    optimizer = build_optimizer(method, stage2)
    losses["loss"].backward()
    optimizer.step()
    after2 = method.state_dict()
    assert_identical(prompts(after2), prompts(after1), "a prompt")
    assert torch.equal(after2["clip.logit_scale"], start["clip.logit_scale"])
    still = [k for k, p in method.named_parameters() if p.requires_grad and torch.equal(after2[k], after1[k])]
    assert not still, f"stage 2 left these unchanged: {still}"


def test_checkpoint_round_trip_keeps_recipe_prompts_and_features(tmp_path):
    method = tiny_pd(n_text_prompts=6, n_image_prompts=3, stage1_lr=0.02, text_prompt_init="").eval()
    save_checkpoint(method, str(tmp_path), {"stage": 0, "epoch": 1})
    loaded, config = load_method(str(tmp_path))
    assert loaded.recipe == method.recipe and config["recipe"]["n_text_prompts"] == 6
    assert_identical(loaded.state_dict(), method.state_dict(), "a weight")
    tokens = loaded.tokenize([CAPTION])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), method.encode_text(tokens))


# --- the real trainer ------------------------------------------------------------------

def _checkpoints(run_dir: str) -> list[tuple[str, dict]]:
    found = [(c, read_config(c)) for c in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(c)]
    return sorted(found, key=lambda item: item[1]["global_step"])


def _weights(checkpoint: str) -> dict:
    return torch.load(os.path.join(checkpoint, MODEL_FILE), weights_only=True)


def _optimizer(checkpoint: str) -> tuple[list[str], set[int], int]:
    """The saved optimizer: names of the parameters it trains, its Adam step counts, and the
    schedule's position (both count the steps taken in the checkpoint's stage)."""
    state = torch.load(os.path.join(checkpoint, OPTIMIZER_FILE), weights_only=True)
    names = [g["name"] for g in state["optimizer"]["param_groups"]]
    return names, {int(s["step"]) for s in state["optimizer"]["state"].values()}, state["scheduler"]["last_epoch"]


def _end_of_stage_1(checkpoints) -> tuple[str, dict]:
    (found,) = [(c, i) for c, i in checkpoints if i["stage"] == 1 and not i["optimizer_in_stage"]]
    return found


@pytest.mark.slow
def test_resume_mid_stage_1_and_mid_stage_2_then_stage_2_alone_from_init(ray_cluster, cuhk_small, tmp_path):
    # schedule stepped per iteration, so the schedule's position counts steps like Adam's
    recipe = {"batch_size": 16, "stage1_epochs": 1, "epochs": 1, "stage1_lr": 1e-2, "lr": 1e-3,
              "schedule_unit": "step", "stage1_warmup_epochs": 0, "warmup_epochs": 0}
    base = dict(method="pd", data=cuhk_small, out=str(tmp_path), name="pd", **TINY, loader_workers=0,
                overrides=recipe, keep_checkpoints=100, log_every=100, seed=3)
    train_table, _ = selection_split(load_manifest(cuhk_small), holdout_fraction=0.05, seed=3)
    steps = sum(len(c) for c in train_table.column("captions").to_pylist()) // 16  # per epoch
    run_dir = os.path.join(tmp_path, "pd")
    torch.manual_seed(3)  # the worker seeds with the run's seed before it builds the model
    num_classes = len(set(train_table.column("person_id").to_pylist()))
    model = PD(BackboneConfig(**TINY), PD.default_recipe.override(**recipe), num_classes)
    start = model.state_dict()
    stage2_names = [n for n, _ in model.named_parameters() if n not in (*PROMPTS, "clip.logit_scale")]
    stage2_count = sum(p.numel() for n, p in model.named_parameters() if n in stage2_names)

    # 1. stop after 3 steps, inside epoch 1 of stage 1
    mid1 = train(TrainConfig(**base, max_steps=3)).latest_checkpoint
    info = read_config(mid1)
    assert (info["stage"], info["stage_name"], info["epoch"], info["optimizer_in_stage"]) == (0, "prompts", 0, True)
    assert info["parameter_counts"]["trainable"] == 4 * 64 + 8 * 64
    assert _optimizer(mid1) == (list(PROMPTS), {3}, 3)

    # 2. resume: stage 1 again (its epoch restarts), then stop 3 steps into stage 2
    stop = 3 + steps + 3
    mid2 = train(TrainConfig(**base, resume=True, max_steps=stop)).latest_checkpoint
    end1, info = _end_of_stage_1(_checkpoints(run_dir))
    assert info["global_step"] == 3 + steps and info["parameter_counts"]["trainable"] == 4 * 64 + 8 * 64
    # the stage-1 optimizer came back: Adam and the schedule also count the 3 steps before the stop
    assert _optimizer(end1) == (list(PROMPTS), {3 + steps}, 3 + steps)
    assert_identical(backbone(_weights(end1)), backbone(start), "a backbone weight in stage 1")
    info = read_config(mid2)
    assert (info["stage"], info["stage_name"], info["epoch"], info["optimizer_in_stage"]) == (1, "finetune", 0, True)
    assert info["global_step"] == stop and info["parameter_counts"]["trainable"] == stage2_count
    assert _optimizer(mid2) == (stage2_names, {3}, 3)  # a fresh optimizer over the stage-2 set
    assert_identical(prompts(_weights(mid2)), prompts(_weights(end1)), "a prompt in stage 2")

    # 3. resume again: stage 2 continues with its optimizer to the end
    final = train(TrainConfig(**base, resume=True)).latest_checkpoint
    info = read_config(final)
    assert (info["stage"], info["global_step"]) == (2, stop + steps)
    assert _optimizer(final) == (stage2_names, {3 + steps}, 3 + steps)
    weights, at_end1 = _weights(final), _weights(end1)
    assert_identical(prompts(weights), prompts(at_end1), "a prompt in stage 2")
    assert not [n for n in stage2_names if torch.equal(weights[n], at_end1[n])]

    # 4. --stage 2 --init <end of stage 1>: stage 2 alone, from the stage-1 prompts, fresh optimizer
    alone = train(TrainConfig(**{**base, "name": "alone"}, init=end1, start_stage=1, max_steps=2)).latest_checkpoint
    info = read_config(alone)
    assert (info["stage"], info["stage_name"], info["global_step"]) == (1, "finetune", 2)
    assert _optimizer(alone) == (stage2_names, {2}, 2)
    assert_identical(prompts(_weights(alone)), prompts(at_end1), "a prompt")


# Learning-test recipe for tpr-tiny (64 wide): more prompt tokens than the ViT-B/16 defaults
# and lrs suited to a small model and a few epochs.
LEARNING_RECIPE = {"batch_size": 32, "n_text_prompts": 8, "n_image_prompts": 16, "stage1_epochs": 5,
                   "stage1_lr": 3e-2, "stage1_warmup_epochs": 1, "epochs": 5, "lr": 1e-3, "warmup_epochs": 1,
                   "weight_decay": 1e-4}


@pytest.mark.slow
def test_stage_1_beats_zero_shot_and_stage_2_beats_stage_1_on_a_new_style(baseline_source, icfg_target, tmp_path):
    manifest = load_manifest(icfg_target)
    test_split = manifest.filter(pc.equal(manifest.column("split"), "test"))
    cpu = torch.device("cpu")
    source, _ = load_method(baseline_source)
    zero_shot = evaluate_split(source, test_split, (384, 128), cpu)

    result = train(TrainConfig(method="pd", data=icfg_target, out=str(tmp_path), name="pd", model="tpr-tiny",
                               pretrained=baseline_source, overrides=LEARNING_RECIPE, loader_workers=0,
                               log_every=100, keep_checkpoints=100))
    runs = _checkpoints(result.run_dir)
    end1, _ = _end_of_stage_1(runs)
    final, final_info = runs[-1]
    assert final_info["stage"] == 2
    after1, after2 = load_method(end1)[0], load_method(final)[0]
    stage1 = evaluate_split(after1, test_split, (384, 128), cpu)
    stage2 = evaluate_split(after2, test_split, (384, 128), cpu)
    numbers = {name: (round(m["R1"], 2), round(m["mAP"], 2))
               for name, m in (("zero-shot", zero_shot), ("stage 1", stage1), ("stage 2", stage2))}
    print(f"PD on icfg_target test (R1, mAP): {numbers}")
    assert zero_shot["R1"] < stage1["R1"] < stage2["R1"], numbers

    # stage 1 left the source backbone untouched; stage 2 left the stage-1 prompts untouched
    source_backbone = {f"clip.{k}": v for k, v in source.clip.state_dict().items()}
    assert_identical(backbone(after1.state_dict()), source_backbone, "a backbone weight in stage 1")
    assert_identical(prompts(after2.state_dict()), prompts(after1.state_dict()), "a prompt in stage 2")
    counts = {i["stage_name"]: i["parameter_counts"]["trainable"] for _, i in runs}
    assert counts == {"prompts": 8 * 64 + 16 * 64, "finetune": counts["finetune"]}
    assert counts["finetune"] == sum(p.numel() for p in after2.clip.parameters()) - 1 + sum(
        p.numel() for p in after2.classifier.parameters())


# --- prompt depth ----------------------------------------------------------------------

def test_deep_prompts_replace_the_prompt_outputs_at_every_later_layer():
    method = tiny_pd(prompt_depth="deep").eval()
    clip, n_text, n_image = method.clip, 4, 8
    layers = len(clip.transformer.resblocks)
    assert method.deep_text_prompts.shape == (layers - 1, n_text, 64)
    assert method.deep_image_prompts.shape == (len(clip.visual.transformer.resblocks) - 1, n_image, 64)
    tokens = method.tokenize([CAPTION, "a girl"])
    torch.manual_seed(2)
    images = torch.randn(2, 3, 384, 128)
    with torch.no_grad():
        x = clip.token_embedding(tokens)
        x = torch.cat([x[:, :1], method.text_prompts.expand(2, -1, -1), x[:, 1:]], dim=1) + clip.positional_embedding
        for layer, block in enumerate(clip.transformer.resblocks):
            if layer:
                x = torch.cat([x[:, :1], method.deep_text_prompts[layer - 1].expand(2, -1, -1), x[:, 1 + n_text:]], 1)
            x = block(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)[torch.arange(2), tokens.argmax(-1) + n_text]
        torch.testing.assert_close(method.encode_text(tokens), x @ clip.text_projection)

        v = clip.visual
        x = torch.cat([v.class_embedding.expand(2, 1, -1), v.conv1(images).flatten(2).transpose(1, 2)], 1)
        x = x + v.positional_embedding
        keep = x.shape[1]
        x = v.ln_pre(torch.cat([x, method.image_prompts.expand(2, -1, -1)], 1))
        for layer, block in enumerate(v.transformer.resblocks):
            if layer:
                x = torch.cat([x[:, :keep], method.deep_image_prompts[layer - 1].expand(2, -1, -1)], 1)
            x = block(x)
        torch.testing.assert_close(method.encode_image(images), v.ln_post(x[:, 0]) @ v.proj)
    # stage 1 trains the deep prompts too; stage 2 leaves all of them alone
    prompt_stage, finetune_stage = method.stages()
    method.set_stage(prompt_stage)
    assert sorted(n for n, p in method.named_parameters() if p.requires_grad) == sorted(
        ["text_prompts", "image_prompts", "deep_text_prompts", "deep_image_prompts"])
    method.set_stage(finetune_stage)
    assert not any(p.requires_grad for n, p in method.named_parameters() if "prompts" in n)


def test_shallow_is_the_default_depth_and_others_are_refused():
    assert PD.default_recipe.prompt_depth == "shallow"
    assert not hasattr(tiny_pd(), "deep_text_prompts")
    with pytest.raises(ConfigError, match="prompt_depth must be one of shallow, deep"):
        tiny_pd(prompt_depth="medium")
