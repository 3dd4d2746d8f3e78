import math

import numpy as np
import torch

from tpr_ray.methods.losses import id_loss, identity_labels, sdm_loss


def sdm_reference(img, txt, pids, temperature, eps=1e-8):
    """Plain-Python SDM: for each row, KL(softmax(sims/t) || normalised same-id mask)."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        rows = []
        for i in range(len(a)):
            logits = [float(a[i] @ b[j]) / temperature for j in range(len(b))]
            m = max(logits)
            z = sum(math.exp(x - m) for x in logits)
            pred = [math.exp(x - m) / z for x in logits]
            same = [1.0 if pids[i] == pids[j] else 0.0 for j in range(len(b))]
            target = [s / sum(same) for s in same]
            rows.append(sum(p * (math.log(p) - math.log(t + eps)) for p, t in zip(pred, target)))
        total += sum(rows) / len(rows)
    return total


def test_sdm_matches_plain_reference_with_shared_identities():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    pids = [3, 3, 7, 9, 9, 9]
    got = sdm_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(pids), temperature=0.1)
    assert math.isclose(float(got), sdm_reference(img, txt, pids, 0.1), rel_tol=1e-6)


def test_sdm_is_near_zero_for_a_perfect_match_and_large_for_a_swap():
    eye = torch.eye(4, dtype=torch.float64)
    pids = torch.tensor([0, 1, 2, 3])
    perfect = sdm_loss(eye, eye, pids, temperature=0.02)
    swapped = sdm_loss(eye, eye[[1, 0, 2, 3]], pids, temperature=0.02)
    assert float(perfect) < 1e-6
    assert float(swapped) > 10.0


def test_identity_labels():
    labels = identity_labels(torch.tensor([1, 2, 1]), torch.tensor([1, 1, 2, 5]))
    assert labels.tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]]


def test_id_loss_is_mean_of_both_modalities():
    clf = torch.nn.Linear(4, 3)
    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 1, 0])
    expected = 0.5 * (torch.nn.functional.cross_entropy(clf(img), labels)
                      + torch.nn.functional.cross_entropy(clf(txt), labels))
    assert torch.allclose(id_loss(clf, img, txt, labels), expected)
