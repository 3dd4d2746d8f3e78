import math

import numpy as np
import pytest
import torch

from tpr_ray.methods.losses import cfine_triplet_loss, cmpc_loss, cmpm_loss, diversity_loss


def cmpm_reference(img, txt, pids, eps=1e-8):
    """Plain-Python CMPM: raw features projected on the other side's unit vectors; the target
    is the same-identity indicator over its L2 norm (CMPM's and CFine's code)."""
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        b_unit = b / np.linalg.norm(b, axis=1, keepdims=True)
        rows = []
        for i in range(len(a)):
            logits = [float(a[i] @ b_unit[j]) for j in range(len(b))]
            m = max(logits)
            z = sum(math.exp(v - m) for v in logits)
            pred = [math.exp(v - m) / z for v in logits]
            same = [1.0 if pids[i] == pids[j] else 0.0 for j in range(len(b))]
            target = [s / math.sqrt(sum(same)) for s in same]
            rows.append(sum(p * (math.log(p) - math.log(t + eps)) for p, t in zip(pred, target)))
        total += sum(rows) / len(rows)
    return total


def test_cmpm_matches_plain_reference_with_shared_identities():
    rng = np.random.default_rng(0)
    img, txt = 3 * rng.normal(size=(6, 8)), 2 * rng.normal(size=(6, 8))
    pids = [3, 3, 7, 9, 9, 9]
    got = cmpm_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(pids))
    assert math.isclose(float(got), cmpm_reference(img, txt, pids), rel_tol=1e-5)


def test_cmpm_uses_the_raw_norm_as_its_scale():
    eye = torch.eye(4)
    pids = torch.tensor([0, 1, 2, 3])
    # unit features: the softmax over cosines is soft; long features make it sharp
    assert float(cmpm_loss(eye, eye, pids)) > 1.0
    assert float(cmpm_loss(40 * eye, 40 * eye, pids)) < 1e-6
    assert float(cmpm_loss(40 * eye, 40 * eye[[1, 0, 2, 3]], pids)) > 10.0


def test_cmpc_classifies_each_feature_projected_on_its_partner():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    weight = rng.normal(size=(4, 3))
    labels = [0, 2, 1, 1, 0]
    w_unit = weight / np.linalg.norm(weight, axis=0, keepdims=True)
    expected = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(5):
            b_unit = b[i] / np.linalg.norm(b[i])
            logits = (float(a[i] @ b_unit) * b_unit) @ w_unit
            expected += (math.log(np.exp(logits).sum()) - logits[labels[i]]) / 5
    got = cmpc_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(labels), torch.tensor(weight))
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    # the classifier's columns are normalised: their length does not matter
    scaled = torch.tensor(weight * np.array([[0.1, 7.0, 3.0]]))
    assert math.isclose(float(cmpc_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(labels), scaled)),
                        expected, rel_tol=1e-5)


def test_diversity_is_the_frobenius_norm_of_the_off_diagonal_gram_over_p_squared():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    half = torch.tensor([0.5, math.sqrt(3) / 2])  # cos(a, half) = 0.5
    # two parts: the off-diagonal Gram holds cos twice, so ||.||_F = sqrt(2) |cos|, over P^2 = 4
    parts = torch.stack([torch.stack([a, b]), torch.stack([a, 3 * a]), torch.stack([a, half])])
    expected = (0.0 + math.sqrt(2) * 1.0 + math.sqrt(2) * 0.5) / 4 / 3
    assert float(diversity_loss(parts)) == pytest.approx(expected, abs=1e-6)
    three = torch.stack([a, b, half]).unsqueeze(0)  # cosines 0 (a,b), 0.5 (a,half), sqrt(3)/2 (b,half)
    assert float(diversity_loss(three)) == pytest.approx(math.sqrt(2 * (0 + 0.25 + 0.75)) / 9, abs=1e-6)
    orthogonal = torch.stack([a, b]).unsqueeze(0).requires_grad_()
    diversity_loss(orthogonal).backward()
    assert torch.isfinite(orthogonal.grad).all()


def test_triplet_sums_hinges_of_hardest_negatives_that_outscore_the_positive():
    scores = torch.tensor([
        [0.9, 0.5, 0.8, 0.1],   # image 0: text 1 shares its person; hardest negative text 2 (0.8 < 0.9: no)
        [0.7, 0.6, 0.2, 0.3],   # image 1: text 0 shares its person; hardest negative text 3 (0.3 < 0.6: no)
        [0.4, 0.95, 0.5, 0.0],  # image 2: hardest negative text 1 (0.95 > 0.5: yes)
        [0.2, 0.1, 0.3, 0.9],   # image 3: hardest negative text 2 (0.3 < 0.9: no)
    ], requires_grad=True)
    pids = torch.tensor([5, 5, 6, 7])
    # text anchors: text 0 -> image 2 (0.4 < 0.9), text 1 -> image 2 (0.95 > 0.6: yes),
    # text 2 -> image 0 (0.8 > 0.5: yes), text 3 -> image 1 (0.3 < 0.9)
    expected = (0.2 - 0.5 + 0.95) + (0.2 - 0.6 + 0.95) + (0.2 - 0.5 + 0.8)
    loss = cfine_triplet_loss(scores, pids, 0.2)
    assert float(loss.detach()) == pytest.approx(expected)
    loss.backward()
    touched = sorted(map(tuple, (scores.grad != 0).nonzero().tolist()))
    assert touched == [(0, 2), (1, 1), (2, 1), (2, 2)]
    assert float(scores.grad[2, 1]) == pytest.approx(2.0)  # hardest for image 2 and for text 1
    assert float(scores.grad[2, 2]) == pytest.approx(-2.0)  # the positive of both image 2 and text 2
    # a negative within the margin but below the positive does not count (unlike a plain hinge)
    assert float(cfine_triplet_loss(torch.tensor([[1.0, 0.95], [0.0, 1.0]]), torch.tensor([1, 2]), 0.2)) == 0.0


def test_triplet_skips_anchors_without_negatives():
    scores = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    assert float(cfine_triplet_loss(scores, torch.tensor([1, 1]))) == 0.0
    pids = torch.tensor([1, 1, 2])
    scores = torch.tensor([[0.5, 0.9, 0.6], [0.9, 0.5, 0.0], [0.0, 0.0, 0.5]])
    # the same-person 0.9 entries are never negatives; image 0's 0.6 beats its 0.5, and so
    # does image 0 for text 2 (0.6 > 0.5)
    assert float(cfine_triplet_loss(scores, pids)) == pytest.approx((0.2 - 0.5 + 0.6) * 2)
