import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tpr_ray.methods.backbone import BackboneConfig
from tpr_ray.model.checkpoint import build_method, load_method, read_config, save_checkpoint
from tpr_ray.errors import ConfigError
from tpr_ray.model.encode import encode_captions, encode_images
from tpr_ray.methods import get_method
from tpr_ray.methods import cfine
from tpr_ray.methods.cfine import (
    CFine, CFineRecipe, cfr_scores, fcd_scores, select_groups, select_patches, select_words, topk_count,
)
from tpr_ray.training.optim import build_optimizer, lr_factor
from tests.helpers import TINY

SOS, EOS = 49406, 49407
CAPTIONS = ["a man in a red coat with a black backpack and blue jeans", "a woman in a green dress",
            "a man in a red coat with a black backpack", "person", "a girl with blonde hair and white shoes", ""]
PIDS = [0, 1, 0, 2, 3, 4]
SMALL = BackboneConfig(**TINY, image_size=(128, 64))  # 8 x 4 patches keep the fast tests fast


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CFine(SMALL, CFine.default_recipe, num_classes=5)


@pytest.fixture(scope="module")
def batch(model):
    torch.manual_seed(1)
    return {"images": torch.randn(6, 3, 128, 64), "tokens": model.tokenize(CAPTIONS),
            "person_ids": torch.tensor(PIDS), "labels": torch.tensor(PIDS)}


# --- token selection -----------------------------------------------------------------------

def test_k_is_the_int_of_a_share_of_the_length_and_at_least_one():
    lengths = torch.tensor([0, 1, 2, 3, 7, 8, 13, 15, 75, 100])
    assert topk_count(lengths, 0.2).tolist() == [1, 1, 1, 1, 1, 1, 2, 3, 15, 20]  # int(), as the official code
    assert topk_count(torch.tensor([193, 197, 5, 25, 35]), 0.1).tolist() == [19, 19, 1, 2, 3]


def test_patch_groups_are_ranks_1_to_k_and_k_plus_1_to_2k_of_the_cls_attention():
    generator = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(192, generator=generator) for _ in range(2)])  # rank -> patch
    attention = torch.empty(2, 192)
    for b in range(2):
        attention[b, order[b]] = torch.linspace(1.0, 0.01, 192)
    groups = select_patches(attention, 0.1)  # K = int(0.1 x (1 + 192)) = 19, [CLS] counted as officially
    assert groups.first.tolist() == order[:, :19].tolist()
    assert groups.second.tolist() == order[:, 19:38].tolist()
    assert groups.first_mask.all() and groups.second_mask.all()

    small = torch.tensor([[0.10, 0.00, 0.02, 0.30, 0.05, 0.01, 0.00, 0.40, 0.00, 0.00,
                           0.00, 0.03, 0.00, 0.00, 0.00, 0.07, 0.00, 0.00, 0.00, 0.02]])
    groups = select_patches(small, 0.1)  # 20 patches: K = int(2.1) = 2
    assert groups.first.tolist() == [[7, 3]] and groups.second.tolist() == [[0, 15]]


def test_word_groups_follow_each_captions_length_and_skip_sos_eos_and_padding():
    tokens = torch.zeros(3, 16, dtype=torch.long)
    tokens[0, :12] = torch.tensor([SOS, *range(10, 20), EOS])  # 10 words: K = 2
    tokens[1, :5] = torch.tensor([SOS, 20, 21, 22, EOS])  # 3 words: K = 1
    tokens[2, :3] = torch.tensor([SOS, 30, EOS])  # 1 word: K = 1, no group 2
    attention = torch.full((3, 16), 0.9)  # [SOS], [EOS] and padding score highest of all
    attention[0, 1:11] = torch.tensor([0.05, 0.30, 0.01, 0.12, 0.20, 0.02, 0.03, 0.09, 0.04, 0.08])
    attention[1, 1:4] = torch.tensor([0.10, 0.05, 0.20])
    attention[2, 1] = 0.01
    g = select_words(attention, tokens, 0.2)
    assert g.first.shape == (3, 2)
    assert g.first_mask.tolist() == [[True, True], [True, False], [True, False]]
    assert g.second_mask.tolist() == [[True, True], [True, False], [False, False]]
    assert g.first[0].tolist() == [2, 5] and g.second[0].tolist() == [4, 8]
    assert g.first[1, 0] == 3 and g.second[1, 0] == 1
    assert g.first[2, 0] == 1


def test_selected_words_of_real_captions_are_real_words(model, batch):
    with torch.no_grad():
        text = model.text_side(batch["tokens"])
    eos = batch["tokens"].argmax(dim=-1)
    n_words = (eos - 1).tolist()  # tokens strictly between [SOS] and [EOS]
    for index, mask in ((text.groups.first, text.groups.first_mask), (text.groups.second, text.groups.second_mask)):
        for b in range(6):
            chosen = index[b][mask[b]].tolist()
            assert all(1 <= p < eos[b] for p in chosen)
    expected_k = [max(1, int(0.2 * n + 1e-9)) for n in n_words]
    assert text.groups.first_mask.sum(dim=1).tolist() == [min(k, n) for k, n in zip(expected_k, n_words)]
    assert text.groups.second_mask.sum(dim=1).tolist() == [max(0, min(k, n - k)) for k, n in zip(expected_k, n_words)]
    g = text.groups
    chosen = torch.cat([g.first[0][g.first_mask[0]], g.second[0][g.second_mask[0]]])
    assert len(set(chosen.tolist())) == len(chosen)  # the two groups never share a word


def test_towers_cfine_cannot_read_are_refused_by_name():
    with pytest.raises(ConfigError, match="CFine cannot use open_clip model 'RN50'"):
        cfine._check_towers(torch.nn.Module(), "RN50")


def test_select_groups_breaks_ties_by_position():
    g = select_groups(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.ones(1, 4, dtype=torch.bool), torch.tensor([2]))
    assert g.first.tolist() == [[0, 1]] and g.second.tolist() == [[2, 3]]


# --- towers --------------------------------------------------------------------------------

def _attention_of(block, h, mask=None):
    """Head-averaged softmax(q k' / sqrt(d)) of an open_clip block, computed by hand."""
    attn = block.attn
    q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads, d = attn.num_heads, h.shape[-1] // attn.num_heads
    q = q.view(h.shape[0], -1, heads, d).transpose(1, 2)
    k = k.view(h.shape[0], -1, heads, d).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1).mean(dim=1)


def test_towers_match_open_clip_and_the_last_layer_attention(model, batch):
    clip = model.clip
    captured = {}
    hooks = [clip.visual.transformer.resblocks[-1].ln_1.register_forward_hook(lambda m, i, o: captured.update(image=o)),
             clip.transformer.resblocks[-1].ln_1.register_forward_hook(lambda m, i, o: captured.update(text=o))]
    try:
        with torch.no_grad():
            ref_image, ref_text = clip.encode_image(batch["images"]), clip.encode_text(batch["tokens"])
        stock = dict(captured)
        with torch.no_grad():
            image_tokens, cls_attention = model._image_tokens(batch["images"])
            text_tokens, eos_attention = model._text_tokens(batch["tokens"])
    finally:
        for h in hooks:
            h.remove()
    eos = batch["tokens"].argmax(dim=-1)
    assert torch.allclose(image_tokens[:, 0], ref_image, atol=1e-5)
    assert torch.allclose(text_tokens[torch.arange(6), eos], ref_text, atol=1e-5)
    expected = _attention_of(clip.visual.transformer.resblocks[-1], stock["image"])[:, 0, 1:]
    assert torch.allclose(cls_attention, expected, atol=1e-6)
    expected = _attention_of(clip.transformer.resblocks[-1], stock["text"], clip.attn_mask)[torch.arange(6), eos]
    assert torch.allclose(eos_attention, expected, atol=1e-6)
    assert float(eos_attention[torch.arange(77).view(1, -1) > eos.view(-1, 1)].abs().max()) == 0.0  # causal


# --- inference -----------------------------------------------------------------------------

def _count_scores(monkeypatch):
    calls = {"cfr": 0, "fcd": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cfine, "cfr_scores", counted("cfr", cfine.cfr_scores))
    monkeypatch.setattr(cfine, "fcd_scores", counted("fcd", cfine.fcd_scores))
    return calls


def test_inference_is_the_normalised_concatenation_of_three_necked_features(model, batch, monkeypatch):
    calls = _count_scores(monkeypatch)
    model.eval()
    images_uint8 = torch.randint(0, 256, (4, 128, 64, 3), dtype=torch.uint8)
    gallery = encode_images(model, images_uint8, torch.device("cpu"))  # the generic embedder path
    queries = encode_captions(model, CAPTIONS, torch.device("cpu"))
    assert gallery.shape == (4, 192) and queries.shape == (6, 192) and model.embed_dim == 192
    with torch.no_grad():
        side = model.text_side(batch["tokens"])
        real = torch.arange(77).view(1, -1) <= batch["tokens"].argmax(dim=-1).view(-1, 1)
        parts = []
        for index, mask in ((side.groups.first, side.groups.first_mask), (side.groups.second, side.groups.second_mask)):
            sequence = torch.cat([side.global_token[:, None], cfine._gather_tokens(side.tokens, index)], dim=1)
            parts.append(model.mgf(sequence, torch.cat([mask.new_ones(6, 1), mask], dim=1), side.tokens, real))
        necked = [model.text_neck(f) for f in [side.global_token, *parts]]  # one neck for all three
    assert torch.allclose(torch.cat(side.features, dim=-1), torch.cat(necked, dim=-1), atol=1e-5)
    np.testing.assert_allclose(queries, F.normalize(torch.cat(necked, dim=-1), dim=-1).numpy(), atol=1e-5)
    assert calls == {"cfr": 0, "fcd": 0}  # no token-level scores outside training

    model.train()
    model(batch)
    assert calls == {"cfr": 1, "fcd": 1}
    model.eval()


def test_checkpoint_round_trip_keeps_recipe_embed_dim_and_embeddings(batch, tmp_path):
    torch.manual_seed(2)
    recipe = CFine.default_recipe.override(text_topk_ratio=0.3, triplet_margin="0.1")
    method = CFine(SMALL, recipe, num_classes=5)
    method.train()
    method(batch)  # moves the necks' running statistics away from their initial values
    method.eval()
    save_checkpoint(method, str(tmp_path), {"epoch": 1})
    assert read_config(str(tmp_path))["embed_dim"] == 192
    loaded, config = load_method(str(tmp_path))
    assert isinstance(loaded.recipe, CFineRecipe) and loaded.recipe == recipe
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(batch["tokens"]), method.encode_text(batch["tokens"]))
        assert torch.equal(loaded.encode_image(batch["images"]), method.encode_image(batch["images"]))


# --- scores and losses ---------------------------------------------------------------------

def _official_scores(gi, gt, patches, patch_mask, words, word_mask, cfr_t=0.07, fcd_t=0.01, k=3):
    """CFR and FCD pair scores computed the way the official code's loops read, one number at a time."""
    unit = lambda v: v / v.norm()  # noqa: E731

    def pool(scaled):  # sum softmax(s) * s
        w = torch.softmax(scaled, dim=0)
        return float((w * scaled).sum())

    n_img, n_txt = len(gi), len(gt)
    p_valid = [[p for p in range(patches.shape[1]) if patch_mask[b, p]] for b in range(n_img)]
    w_valid = [[w for w in range(words.shape[1]) if word_mask[b, w]] for b in range(n_txt)]
    cfr = torch.zeros(n_img, n_txt)
    for i in range(n_img):
        for j in range(n_txt):
            iw = torch.stack([unit(gi[i]) @ unit(words[j, w]) for w in w_valid[j]]) / cfr_t
            pt = torch.stack([unit(patches[i, p]) @ unit(gt[j]) for p in p_valid[i]]) / cfr_t
            cfr[i, j] = 0.5 * (pool(iw) + pool(pt))
    # correspondences inside each matched pair b (image b, text b)
    pos_word, pos_clip = {}, {}
    for b in range(min(n_img, n_txt)):
        cos = {(p, w): float(unit(patches[b, p]) @ unit(words[b, w])) for p in p_valid[b] for w in w_valid[b]}
        for p in p_valid[b]:
            best = sorted(w_valid[b], key=lambda w: -cos[p, w])[:k]
            if best:
                pos_word[b, p] = torch.stack([words[b, w] for w in best]).mean(0)
        share = {}
        for p in p_valid[b]:
            z = sum(math.exp(cos[p, w]) for w in w_valid[b])
            for w in w_valid[b]:
                share[p, w] = math.exp(cos[p, w]) / z
        for w in w_valid[b]:
            best = sorted(p_valid[b], key=lambda p: -share[p, w])[:k]
            pos_clip[b, w] = torch.stack([patches[b, p] for p in best]).mean(0)
    fcd = torch.zeros(n_img, n_txt)
    for i in range(n_img):
        for j in range(n_txt):
            pw0 = [float(unit(patches[i, p]) @ unit(pos_word[j, p])) / fcd_t for p in p_valid[i] if (j, p) in pos_word]
            pw1 = [float(unit(pos_clip[i, w]) @ unit(words[j, w])) / fcd_t for w in w_valid[j] if (i, w) in pos_clip]
            fcd[i, j] = 0.5 * ((sum(pw0) / len(pw0) if pw0 else 0.0) + (sum(pw1) / len(pw1) if pw1 else 0.0))
    return cfr, fcd


def test_cfr_and_fcd_match_the_official_computation_done_by_hand():
    torch.manual_seed(3)
    gi, gt = torch.randn(4, 8), torch.randn(4, 8)
    patches, words = torch.randn(4, 5, 8), torch.randn(4, 4, 8)
    patch_mask = torch.ones(4, 5, dtype=torch.bool)
    # (a one-word caption would make every patch's softmax share 1: a tie the official code never meets)
    word_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    expected_cfr, expected_fcd = _official_scores(gi, gt, patches, patch_mask, words, word_mask)
    cfr = cfr_scores(gi, gt, patches, patch_mask, words, word_mask, 0.07)
    fcd = fcd_scores(patches, patch_mask, words, word_mask, 3, 0.01)
    torch.testing.assert_close(cfr, expected_cfr, atol=1e-4, rtol=1e-5)  # scaled units: cos / 0.07
    torch.testing.assert_close(fcd, expected_fcd, atol=1e-3, rtol=1e-5)  # cos / 0.01
    assert float(fcd.abs().max()) > 1.0 and float(cfr.abs().max()) > 1.0  # not cosine units


def test_fcd_reuses_the_matched_pairs_correspondences_for_every_pair():
    """Text j's words chosen inside pair (j, j) are what image i's patches meet in pair (i, j)."""
    patches = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])  # one patch per image
    words = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    ones = torch.ones(2, 1, dtype=torch.bool)
    fcd = fcd_scores(patches, ones, words, torch.ones(2, 2, dtype=torch.bool), topk=1, temperature=1.0)
    # pair (0, 1): image 0's patch [1,0,0] vs text 1's word chosen by image 1's patch [0,1,0]: [0,1,0] -> cos 0;
    # text 1's words vs image 0's patch (the only one) -> cos 0 and 0
    assert float(fcd[0, 1]) == pytest.approx(0.0)
    # pair (0, 0): patch vs its own best word [1,0,0] -> 1; words [0,0,1], [1,0,0] vs the patch -> 0, 1
    assert float(fcd[0, 0]) == pytest.approx(0.5 * (1.0 + 0.5))


def test_scores_stay_finite_for_a_caption_without_words():
    patches = torch.randn(2, 3, 8, requires_grad=True)
    words = torch.randn(2, 2, 8, requires_grad=True)
    word_mask = torch.tensor([[True, True], [False, False]])
    scores = fcd_scores(patches, torch.ones(2, 3, dtype=torch.bool), words, word_mask) + cfr_scores(
        torch.randn(2, 8), torch.randn(2, 8), patches, torch.ones(2, 3, dtype=torch.bool), words, word_mask)
    scores.sum().backward()
    assert torch.isfinite(scores).all() and torch.isfinite(patches.grad).all() and torch.isfinite(words.grad).all()


def _grad_reaches(model, loss, names):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        g = params[name].grad
        assert g is None or torch.isfinite(g).all(), name
        out[name] = g is not None and float(g.abs().sum()) > 0
    return out


def test_each_loss_term_is_finite_and_trains_what_it_should(model, batch):
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss", "cmpm", "cmpc", "diversity", "triplet"}
    assert all(torch.isfinite(v) for v in losses.values())
    r = model.recipe
    total = (losses["cmpm"] + losses["cmpc"] + r.diversity_weight * losses["diversity"]
             + r.triplet_weight * losses["triplet"])
    assert torch.allclose(losses["loss"], total)
    names = ["clip.visual.conv1.weight", "clip.token_embedding.weight", "mgf.self_attn.in_proj_weight",
             "mgf.cross_attn.in_proj_weight", "mgf.mlp.c_fc.weight", "image_neck.weight", "text_neck.weight",
             "cmpc_classifier"]
    expected = {
        "cmpm": {n: n != "cmpc_classifier" for n in names},
        "cmpc": {n: True for n in names},
        # the part features (through the shared necks), not the classifier
        "diversity": {n: n != "cmpc_classifier" for n in names},
        # CFR/FCD read the projected tokens: the towers learn, MGF/necks/classifier do not
        "triplet": {n: n.startswith("clip.") for n in names},
    }
    for term, reach in expected.items():
        assert _grad_reaches(model, losses[term], names) == reach, term
    model.zero_grad(set_to_none=True)
    model.eval()


def test_loss_weights_are_the_official_ones(model, batch):
    from tpr_ray.methods.losses import cmpc_loss, cmpm_loss

    model.train()
    with torch.no_grad():
        losses = model(batch)
        image, text = model.image_side(batch["images"]), model.text_side(batch["tokens"])
        pids, labels = batch["person_ids"], batch["labels"]
        pairs = list(zip(image.features, text.features))
        cmpm = sum(w * cmpm_loss(a, b, pids) for w, (a, b) in zip((1.0, 1.0, 0.1), pairs))  # 0.1 on CMPM only
        cmpc = sum(cmpc_loss(a, b, labels, model.cmpc_classifier) for a, b in pairs)  # weight 1 each
        pair = model.pair_scores(image, text)
        g, t = image.groups, text.groups
        fcd = fcd_scores(cfine._gather_tokens(image.tokens, g.first), g.first_mask,
                         cfine._gather_tokens(text.tokens, t.first), t.first_mask)
        cfr = cfr_scores(image.global_token, text.global_token,
                         cfine._gather_tokens(image.tokens, torch.cat([g.first, g.second], 1)),
                         torch.cat([g.first_mask, g.second_mask], 1),
                         cfine._gather_tokens(text.tokens, torch.cat([t.first, t.second], 1)),
                         torch.cat([t.first_mask, t.second_mask], 1))
    model.eval()
    torch.testing.assert_close(losses["cmpm"], cmpm)
    torch.testing.assert_close(losses["cmpc"], cmpc)
    torch.testing.assert_close(pair, cfr + fcd)  # summed, not averaged


# --- recipe --------------------------------------------------------------------------------

def test_recipe_defaults_are_the_papers_and_new_modules_learn_ten_times_faster():
    r = get_method("cfine").default_recipe
    assert isinstance(r, CFineRecipe)
    assert (r.optimizer, r.lr, r.lr * r.new_module_lr_mult, r.schedule, r.epochs, r.batch_size) == (
        "adam", 1e-5, pytest.approx(1e-4), "step", 50, 32)
    assert (r.image_topk_ratio, r.text_topk_ratio, r.fcd_topk, r.cfr_temperature, r.fcd_temperature) == (
        0.1, 0.2, 3, 0.07, 0.01)
    assert (r.cmpm_global_weight, r.cmpm_group1_weight, r.cmpm_group2_weight, r.cmpc_weight, r.diversity_weight,
            r.triplet_weight, r.triplet_margin) == (1.0, 1.0, 0.1, 1.0, 0.2, 10.0, 0.2)
    assert r.schedule_unit == "epoch" and r.adam_eps == 1e-8
    assert not hasattr(r, "temperature") and not hasattr(r, "id_loss_weight")
    # warm-up from 1 % over 10 epochs, then x0.1 at epochs 20, 25 and 35 (WarmupMultiStepLR; one step per epoch)
    assert r.step_milestones == (20, 25, 35)
    factors = [lr_factor(e, r.warmup_epochs, r.epochs, r.warmup_factor, r.schedule, r.step_decay_epochs, r.step_gamma,
                         r.step_milestones) for e in (0, 10, 19, 20, 24, 25, 34, 35, 49)]
    assert factors == pytest.approx([0.01, 1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_param_groups_and_trainable_set(model):
    (stage,) = model.stages()
    model.set_stage(stage)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["clip.logit_scale", "image_neck.bias", "text_neck.bias"]
    assert isinstance(build_optimizer(model, stage), torch.optim.Adam)
    groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in model.param_groups(stage.recipe)}
    # the official three groups: new modules + CMPC (lr 1e-4, no decay), image tower (1e-5, 4e-5), text (1e-5, 0)
    for name in ("mgf.self_attn.in_proj_weight", "mgf.mlp.c_proj.bias", "image_neck.weight", "cmpc_classifier"):
        assert groups[name] == (pytest.approx(1e-4), 0.0), name
    for name in ("clip.visual.conv1.weight", "clip.visual.transformer.resblocks.0.attn.in_proj_bias"):
        assert groups[name] == (pytest.approx(1e-5), pytest.approx(4e-5)), name
    for name in ("clip.text_projection", "clip.token_embedding.weight", "clip.ln_final.bias"):
        assert groups[name] == (pytest.approx(1e-5), 0.0), name


def test_mgf_block_is_the_official_one():
    block = cfine.MGFBlock(64, 1)
    assert type(block.mlp.gelu).__name__ == "QuickGELU"
    # three LayerNorms (self-attention, cross-attention query, MLP): the context goes in raw
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in block.modules()) == 3
    torch.manual_seed(0)
    seq, ctx = torch.randn(2, 3, 64), torch.randn(2, 5, 64)
    out = block(seq, torch.ones(2, 3, dtype=torch.bool), ctx)
    x = seq + block.self_attn(*[block.ln_self(seq)] * 3)[0]
    x = x + block.cross_attn(block.ln_query(x), ctx, ctx)[0]
    x = x + block.mlp(block.ln_mlp(x))
    torch.testing.assert_close(out, x[:, 0])


# --- end to end (Ray) ---------------------------------------------------------------------

# The official triplet (scaled units, summed over anchors, x10) is sized for the official tower
# lr of 1e-5; at this test's lr of 1e-3 on the tiny model it swamps the other losses and R1
# does not move in 6 epochs (measured: R1 7/107 -> 7/107 at x10, 7/107 -> 19/107 at x0.1), so this
# learning test weighs it 0.1. The official weights stay the defaults (test above).
LEARN_ARGS = ["--model", "tpr-tiny", "--batch-size", "16", "--epochs", "6", "--lr", "1e-3", "--loader-workers", "0",
              "--set", "new_module_lr_mult=3", "--set", "warmup_epochs=1", "--set", "warmup_factor=0.1",
              "--set", "schedule=constant", "--set", "weight_decay=1e-4", "--set", "triplet_weight=0.1"]


def _cli(args):
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _test_split(data):
    from tpr_ray.data import load_manifest

    manifest = load_manifest(data)
    return manifest.filter(np.asarray(manifest.column("split").to_pylist()) == "test")


@pytest.fixture(scope="module")
def cfine_run(ray_cluster, baseline_source, icfg_target, tmp_path_factory):
    """`tpr-ray train --method cfine`, adapting the CUHK-style tiny baseline to ICFG style."""
    out = tmp_path_factory.mktemp("cfine_runs")
    tick = time.perf_counter()
    _cli(["train", "--method", "cfine", "--data", icfg_target, "--out", str(out), "--name", "learn",
          "--pretrained", baseline_source, *LEARN_ARGS])
    print(f"\ncfine training run: {time.perf_counter() - tick:.1f} s")
    return str(out / "learn")


@pytest.mark.slow
def test_cfine_learns_on_a_synthetic_style(cfine_run, baseline_source, icfg_target):
    from tpr_ray.io import storage
    from tpr_ray.training.inputs import evaluate_split

    test = _test_split(icfg_target)
    cpu = torch.device("cpu")
    torch.manual_seed(0)  # the trainer seeds the same way before building the model: same start
    start = build_method(CFine, BackboneConfig("tpr-tiny", baseline_source), CFine.default_recipe, num_classes=1)
    before = evaluate_split(start, test, (384, 128), cpu)
    latest = storage.read_json(storage.join(cfine_run, "best.json"))["latest"]
    trained, config = load_method(latest)
    after = evaluate_split(trained, test, (384, 128), cpu)
    print(f"\nCFine on synthetic ICFG test ({test.num_rows} images): R1 {before['R1']:.2f} -> {after['R1']:.2f}, "
          f"mAP {before['mAP']:.2f} -> {after['mAP']:.2f}, embed_dim {config['embed_dim']}")
    assert config["method"] == "cfine" and config["embed_dim"] == 192 and config["stage"] == 1  # all epochs done
    assert after["R1"] >= before["R1"] + 10.0
    assert after["mAP"] >= before["mAP"] + 10.0


@pytest.mark.slow
def test_generic_embed_and_eval_jobs_run_a_cfine_checkpoint(cfine_run, icfg_target, tmp_path):
    from tpr_ray.training.inputs import evaluate_split

    emb = str(tmp_path / "emb")
    _cli(["embed", "--checkpoint", cfine_run, "--data", icfg_target, "--out", emb])
    _cli(["eval", "--embeddings", emb, "--out", str(tmp_path / "metrics.json")])
    metrics = json.load(open(tmp_path / "metrics.json"))
    method, config = load_method(cfine_run)
    expected = evaluate_split(method, _test_split(icfg_target), (384, 128), torch.device("cpu"))
    assert metrics["method"] == "cfine" and metrics["dim"] == config["embed_dim"] == 192
    for key in ("R1", "R5", "mAP", "mINP"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-3), key
