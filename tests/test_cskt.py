import os

import pyarrow.compute as pc
import pytest
import torch

from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.model.checkpoint import MODEL_FILE, load_method, read_config, save_checkpoint
from tpr_ray.errors import ConfigError
from tpr_ray.methods import get_method
from tpr_ray.training.optim import build_optimizer
from tests.helpers import TINY

CSKT = get_method("cskt")
CAPTIONS = ["a man", "a woman in a red coat with a black backpack", " ".join(["tall"] * 100)]


def tiny_cskt(pretrained=None, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return CSKT(BackboneConfig("tpr-tiny", pretrained), CSKT.default_recipe.override(**overrides), num_classes=5)


def adapter_size(d: int, r: int = 8) -> int:
    return 2 * d + (d * (d // r) + d // r) + ((d // r) * d + d)  # LayerNorm, down, up


def added_size(depth: int, length: int, text_width: int, image_width: int) -> dict:
    return {
        "prompts": depth * length * (text_width + image_width),
        "projections": depth * (text_width * image_width + image_width + image_width * text_width + text_width),
        "adapters": depth * (adapter_size(text_width) + adapter_size(image_width)),
    }


def a_batch(method, n=4):
    torch.manual_seed(1)
    captions = ["a man in a red coat", "a man in a red jacket", "a woman with a bag", "a boy in blue shorts"][:n]
    return {"images": torch.randn(n, 3, 384, 128), "tokens": method.tokenize(captions),
            "person_ids": torch.tensor([0, 0, 1, 2][:n]), "labels": torch.tensor([0, 0, 1, 2][:n])}


def test_vit_b16_trains_7_4_to_7_5_percent_of_its_parameters():
    method = CSKT(BackboneConfig("ViT-B-16", None), CSKT.default_recipe, num_classes=10)  # built, never run
    counts = method.parameter_counts()
    expected = added_size(depth=12, length=4, text_width=512, image_width=768)
    assert {k: counts[k] for k in expected} == expected
    assert counts["trainable"] == sum(expected.values()) == 12_117_888
    assert counts["total"] == sum(p.numel() for p in method.clip.parameters()) + counts["trainable"]
    assert 7.4 <= 100 * counts["trainable"] / counts["total"] <= 7.5  # 12,117,888 of 161,735,553: 7.49 %


def test_exactly_prompts_projections_and_adapters_require_grad():
    method = tiny_cskt()
    (stage,) = method.stages()
    method.set_stage(stage)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in method.named_parameters() if not n.startswith("clip.")}
    assert all(n.startswith(("prompts.", "adapters.")) for n in trainable)
    assert not any(p.requires_grad for p in method.clip.parameters())  # logit scale included
    assert method.parameter_counts()["trainable"] == sum(added_size(2, 4, 64, 64).values()) == 22_560
    assert len([n for n in trainable if n.startswith("adapters.")]) == 2 * 2 * 6  # 2 towers x 2 blocks x (ln, down, up)


def test_one_step_changes_every_added_weight_and_no_backbone_weight():
    method = tiny_cskt()
    (stage,) = method.stages()
    method.set_stage(stage)
    optimizer = build_optimizer(method, stage)
    backbone = {k: v.clone() for k, v in method.clip.state_dict().items()}
    added = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}

    losses = method(a_batch(method))
    assert set(losses) == {"loss", "sdm"} and torch.equal(losses["loss"], losses["sdm"])  # SDM only
    losses["loss"].backward()
    for name, param in method.named_parameters():
        if name.startswith("clip."):
            assert param.grad is None, name
        else:  # a real gradient, not just weight decay, moves every added weight
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()

    for key, value in method.clip.state_dict().items():
        assert torch.equal(value, backbone[key]), key
    for name, param in method.named_parameters():
        if name in added:
            assert not torch.equal(param, added[name]), name


def test_optimizer_follows_the_recipe():
    groups = {g["name"]: g for g in tiny_cskt().param_groups(CSKT.default_recipe)}
    assert groups["prompts.text"]["lr"] == pytest.approx(3e-4)
    assert groups["prompts.text"]["weight_decay"] == pytest.approx(4e-5)
    assert groups["adapters.text.0.up.bias"]["lr"] == pytest.approx(6e-4)  # IRRA-codebase bias multiplier
    assert groups["adapters.text.0.up.bias"]["weight_decay"] == 0.0
    assert not any(name.startswith("clip.") for name in groups)


def test_recipe_defaults_are_the_papers_and_overridable():
    r = CSKT.default_recipe
    assert (r.lr, r.adam_eps, r.weight_decay, r.temperature) == (3e-4, 1e-3, 4e-5, 0.02)
    assert (r.schedule, r.warmup_epochs, r.epochs, r.batch_size, r.optimizer) == ("cosine", 5, 60, 128, "adam")
    assert (r.prompt_length, r.adapter_reduction, r.image_adapter_scale, r.text_adapter_scale) == (4, 8, 0.1, 4.0)
    assert r.prompt_init == "a photo of a"
    changed = r.override(lr="1e-3", epochs="3", prompt_length="2", text_adapter_scale="2")
    assert (changed.lr, changed.epochs, changed.prompt_length, changed.text_adapter_scale) == (1e-3, 3, 2, 2.0)
    with pytest.raises(ConfigError, match="unknown recipe option"):
        r.override(prompt_lenght=2)
    method = tiny_cskt(prompt_length=2, adapter_reduction=4)
    assert method.tokenize(["a man"]).shape == (1, 77 - 4)
    assert method.parameter_counts()["prompts"] == 2 * 2 * (64 + 64)
    assert method.adapters["text"][0].down.out_features == 16
    with pytest.raises(ConfigError, match="no room for a caption"):
        tiny_cskt(prompt_length=38)


def test_layer1_text_prompts_start_from_the_phrase_embeddings():
    method = tiny_cskt()
    ids = method.tokenizer(["a photo of a"])[0, 1:5]  # between [SOS] and [EOS]
    assert torch.equal(method.prompts.text[0].detach(), method.clip.token_embedding.weight[ids])
    assert 0.01 < method.prompts.text[1].std().item() < 0.03  # deeper layers: N(0, 0.02)


def _block_inputs(blocks):
    """Record the input of every block (what its ln_1 sees)."""
    seen = []
    hooks = [b.ln_1.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach())) for b in blocks]
    return seen, hooks


def test_prompts_are_replaced_not_accumulated_at_every_layer():
    method = tiny_cskt().eval()
    clip, prompts = method.clip, method.prompts
    batch = a_batch(method, n=2)
    with torch.no_grad():
        seen, hooks = _block_inputs(clip.visual.transformer.resblocks)
        method.encode_image(batch["images"])
        for h in hooks:
            h.remove()
        assert [x.shape[1] for x in seen] == [1 + 24 * 8 + 8] * 2  # [CLS] + patches + 8 prompts at every layer
        torch.testing.assert_close(seen[0][:, -8:], clip.visual.ln_pre(prompts.image_tokens(0)).expand(2, -1, -1))
        assert torch.equal(seen[1][:, -8:], prompts.image_tokens(1).expand(2, -1, -1))  # replaced, as is
        assert torch.equal(prompts.image_tokens(1)[4:], prompts.text_to_image[1](prompts.text[1]))  # coupled

        seen, hooks = _block_inputs(clip.transformer.resblocks)
        method.encode_text(batch["tokens"])
        for h in hooks:
            h.remove()
        assert [x.shape[1] for x in seen] == [77, 77]  # the causal context keeps its length
        pos = clip.positional_embedding
        torch.testing.assert_close(seen[0][:, 1:9], (prompts.text_tokens(0) + pos[1:9]).expand(2, -1, -1))
        caption = clip.token_embedding(batch["tokens"][:, 1:]) + pos[9:]  # shifted right by the 8 prompts
        torch.testing.assert_close(seen[0][:, 9:], caption)
        assert torch.equal(seen[1][:, 1:9], prompts.text_tokens(1).expand(2, -1, -1))
        assert torch.equal(prompts.text_tokens(1)[4:], prompts.image_to_text[1](prompts.image[1]))


def test_text_feature_is_read_at_eos_shifted_by_the_prompts_and_long_captions_keep_eos():
    method = tiny_cskt().eval()
    tokens = method.tokenize(CAPTIONS)
    plain = method.tokenizer(CAPTIONS)  # CLIP's 77-token rows
    eot = method.tokenizer.eot_token_id
    assert tokens.shape == (3, 69)  # [SOS] + 68 positions for caption and [EOS]
    assert tokens[2, -1] == eot and torch.equal(tokens[2, :68], plain[2, :68])  # cut, [EOS] kept
    assert torch.equal(tokens[:2], plain[:2, :69])  # short captions are unchanged
    eos = (tokens == eot).int().argmax(dim=1)
    assert eos.tolist() == [3, int((plain[1] == eot).int().argmax()), 68]

    final = []
    hook = method.clip.ln_final.register_forward_hook(lambda mod, args, out: final.append(out))
    with torch.no_grad():
        feats = method.encode_text(tokens)
        from_plain = method.encode_text(plain)  # 77-wide rows are fitted the same way
    hook.remove()
    expected = final[0][torch.arange(3), eos + 8] @ method.clip.text_projection
    assert (eos + 8).tolist()[2] == 76  # the longest caption's [EOS] sits in the last position
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_plain, feats, rtol=0, atol=0)


def test_without_prompts_and_adapters_it_is_open_clip_itself():
    """The hand-iterated encoders reproduce open_clip's exactly once CSKT's additions are off."""
    method = tiny_cskt(prompt_length=0, image_adapter_scale=0.0, text_adapter_scale=0.0).eval()
    batch = a_batch(method, n=2)
    tokens = method.tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(method.encode_image(batch["images"]), method.clip.encode_image(batch["images"]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(method.encode_text(tokens), method.clip.encode_text(tokens), rtol=0, atol=0)


def _outputs(method):
    method.eval()  # eval and train differ in the last bits: attention takes a fused path in eval
    batch = a_batch(method, n=3)
    with torch.no_grad():
        return method.encode_image(batch["images"]), method.encode_text(method.tokenize(CAPTIONS))


def test_checkpoint_holds_only_added_weights_and_reloads_to_identical_outputs(tmp_path):
    torch.manual_seed(2)
    clip_file = str(tmp_path / "tiny_clip.pt")  # a local pretrained file: the backbone reference
    torch.save(CSKT(BackboneConfig(**TINY), CSKT.default_recipe, 5).clip.state_dict(), clip_file)
    method = tiny_cskt(pretrained=clip_file)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # as if trained
    save_checkpoint(method, str(tmp_path / "ckpt"), {"parameter_counts": method.parameter_counts()})

    state = torch.load(tmp_path / "ckpt" / MODEL_FILE, weights_only=True)
    assert set(state) == {n for n, p in method.named_parameters() if p.requires_grad}  # no backbone weight
    config = read_config(str(tmp_path / "ckpt"))
    assert config["backbone"]["pretrained"] == clip_file and config["method"] == "cskt"
    assert config["parameter_counts"]["trainable"] == 22_560

    loaded, _ = load_method(str(tmp_path / "ckpt"))
    for got, want in zip(_outputs(loaded), _outputs(method)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_random_init_backbone_is_kept_in_the_checkpoint_since_nothing_can_rebuild_it(tmp_path):
    method = tiny_cskt(pretrained=None)
    save_checkpoint(method, str(tmp_path / "ckpt"), {})
    state = torch.load(tmp_path / "ckpt" / MODEL_FILE, weights_only=True)
    assert "clip.visual.conv1.weight" in state
    loaded, _ = load_method(str(tmp_path / "ckpt"))
    for got, want in zip(_outputs(loaded), _outputs(method)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- end to end ---------------------------------------------------------------

ADAPT_RECIPE = {"lr": 3e-3, "batch_size": 32, "epochs": 10, "warmup_epochs": 1}


@pytest.fixture(scope="module")
def adapted(ray_cluster, baseline_source, icfg_target, tmp_path_factory):
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train

    out = str(tmp_path_factory.mktemp("cskt_runs"))
    result = train(TrainConfig(method="cskt", data=icfg_target, out=out, name="cskt", model="tpr-tiny",
                               pretrained=baseline_source, overrides=ADAPT_RECIPE, loader_workers=0, log_every=100))
    return result


def _test_split(data):
    from tpr_ray.data import load_manifest

    manifest = load_manifest(data)
    return manifest.filter(pc.equal(manifest.column("split"), "test"))


@pytest.mark.slow
def test_cskt_adapts_a_baseline_to_a_new_style(adapted, baseline_source, icfg_target):
    from tpr_ray.training.inputs import evaluate_split

    test = _test_split(icfg_target)
    source, _ = load_method(baseline_source)
    zero_shot = evaluate_split(source, test, (384, 128), torch.device("cpu"))
    method, config = load_method(adapted.latest_checkpoint)
    after = evaluate_split(method, test, (384, 128), torch.device("cpu"))
    print(f"\nICFG-style test R1: source zero-shot {zero_shot['R1']:.2f} -> CSKT {after['R1']:.2f} "
          f"(mAP {zero_shot['mAP']:.2f} -> {after['mAP']:.2f})")
    assert after["R1"] > zero_shot["R1"]

    assert config["backbone"]["pretrained"] == baseline_source
    assert config["parameter_counts"]["trainable"] == 22_560
    state = torch.load(os.path.join(adapted.latest_checkpoint, MODEL_FILE), weights_only=True)
    assert not any(k.startswith("clip.") for k in state)
    # the frozen backbone is the source's CLIP, bit for bit
    for key, value in source.clip.state_dict().items():
        assert torch.equal(method.clip.state_dict()[key], value), key


@pytest.mark.slow
def test_embedder_and_evaluator_handle_a_cskt_checkpoint(adapted, icfg_target, tmp_path):
    from tpr_ray.embedding.pipeline import EmbedConfig, embed
    from tpr_ray.evaluation.in_memory import evaluate_embeddings
    from tpr_ray.training.inputs import evaluate_split

    out = str(tmp_path / "emb")
    embed(EmbedConfig(checkpoint=adapted.run_dir, data=icfg_target, out=out, split="test", batch_size=16))
    metrics = evaluate_embeddings(os.path.join(out, "gallery"), os.path.join(out, "queries"))
    method, _ = load_method(adapted.run_dir)
    reference = evaluate_split(method, _test_split(icfg_target), (384, 128), torch.device("cpu"))
    for key in ("R1", "R5", "mAP", "mINP"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-6), key


def test_every_new_linear_starts_as_the_reference_does():
    """Liu-Yating/CSKT applies N(0, 0.02) weights and zero biases to every Linear it adds."""
    torch.manual_seed(0)
    cls = get_method("cskt")
    method = cls(BackboneConfig(**TINY), cls.default_recipe, num_classes=2)
    linears = [m for m in [*method.prompts.modules(), *method.adapters.modules()] if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 2 + 2 * 2 * 2  # coupling pairs per layer; adapter down + up per block
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert 0.018 < weights.std().item() < 0.022 and abs(weights.mean().item()) < 2e-3
    assert all(m.bias.abs().max() == 0 for m in linears)
    ups = torch.cat([a.up.weight.flatten() for side in method.adapters.values() for a in side])
    assert 0.018 < ups.std().item() < 0.022  # the adapters' output projections too
