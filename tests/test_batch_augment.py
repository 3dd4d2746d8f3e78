import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms.v2 import functional as F

from tpr_ray.training.augment import (
    AugmentSettings,
    BatchAugment,
    erase_,
    erase_boxes,
    flip,
    pad_crop,
)
from tpr_ray.model.transforms import CLIP_MEAN, CLIP_STD, train_augment

MEAN = CLIP_MEAN.flatten().tolist()
STD = CLIP_STD.flatten().tolist()


def _images(n, h=16, w=8, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("vectorised", [True, False])
def test_flip_mirrors_only_the_chosen_images(vectorised):
    images = _images(2)
    out = flip(images, torch.tensor([True, False]), vectorised)
    assert torch.equal(out[0], images[0].flip(1))
    assert torch.equal(out[0][:, 0], images[0][:, -1])
    assert torch.equal(out[1], images[1])


@pytest.mark.parametrize("vectorised", [True, False])
def test_pad_crop_matches_torchvision_pad_then_crop(vectorised):
    images = _images(3)
    top, left = torch.tensor([0, 10, 20]), torch.tensor([20, 10, 3])
    out = pad_crop(images, 10, top, left, vectorised)
    for k in range(3):
        chw = images[k].permute(2, 0, 1)
        expected = F.crop(F.pad(chw, [10]), int(top[k]), int(left[k]), 16, 8)
        assert torch.equal(out[k].permute(2, 0, 1), expected)
    assert torch.equal(out[1], images[1])  # offset (pad, pad) is the identity
    assert out[0, :10].eq(0).all()  # top 0: the first 10 rows are the padding
    assert torch.equal(out[2, :6, 7:], images[2, 10:, :1])  # top 20, left 3: the bottom-left corner


def test_random_crop_offsets_stay_within_the_padding():
    images = _images(40, seed=1)
    aug = BatchAugment("cpu", seed=5, settings=AugmentSettings(flip_p=0.0, erase_p=0.0))
    out = aug(images)
    # undo normalisation, then find each output among every possible crop of the padded input
    pixels = (out * CLIP_STD + CLIP_MEAN).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    offsets = set()
    for k in range(len(images)):
        padded = torch.nn.functional.pad(images[k], (0, 0, 10, 10, 10, 10))
        found = [(t, left) for t in range(21) for left in range(21) if torch.equal(padded[t:t + 16, left:left + 8], pixels[k])]
        assert found, f"output {k} is no crop of its padded input"
        offsets.add(found[0])
    assert len(offsets) > 20  # offsets are drawn, not fixed


@pytest.mark.parametrize("vectorised", [True, False])
def test_erase_matches_torchvision_erase_with_the_mean_before_normalising(vectorised):
    images = _images(2)
    boxes = torch.tensor([[3, 2, 5, 4], [0, 0, 0, 0]])
    x = (images.permute(0, 3, 1, 2).float() / 255 - CLIP_MEAN) / CLIP_STD
    out = erase_(x.clone(), boxes, vectorised=vectorised)
    reference = F.erase(images[0].permute(2, 0, 1).float() / 255, 3, 2, 5, 4,
                        torch.tensor(MEAN).view(3, 1, 1))
    torch.testing.assert_close(out[0], F.normalize(reference, MEAN, STD), atol=1e-6, rtol=0)
    assert out[0, :, 3:8, 2:6].eq(0).all() and out[0].ne(0).sum() == 3 * (16 * 8 - 20)
    assert torch.equal(out[1], x[1])  # height 0: untouched


def test_erase_boxes_fit_and_follow_the_configured_area_and_aspect_ranges():
    h, w, n = 384, 128, 4000
    boxes = erase_boxes(n, (h, w), AugmentSettings(), torch.Generator().manual_seed(0))
    top, left, bh, bw = boxes.T
    erased = bh > 0
    assert 0.47 < erased.float().mean() < 0.53
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    area = (bh * bw)[erased].float() / (h * w)
    aspect = (bh.float() / bw.float())[erased]
    assert area.min() > 0.02 * 0.9 and area.max() < 0.4 * 1.1  # rounding to whole pixels
    assert aspect.min() > 0.3 * 0.9 and aspect.max() < 3.3 * 1.1
    # torchvision's own draw as the independent reference for the distribution
    torch.manual_seed(0)
    image = torch.zeros(3, h, w)
    ref = [T.RandomErasing.get_params(image, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=[0.0]) for _ in range(2000)]
    ref_area = torch.tensor([b[2] * b[3] / (h * w) for b in ref if b[2] < h])
    assert abs(area.mean() - ref_area.mean()) < 4 * ref_area.std() / len(ref_area) ** 0.5


def test_no_augmentation_is_the_per_sample_normalisation():
    images = _images(3, h=384, w=128)
    out = BatchAugment("cpu", augment=False)(images)
    for k in range(3):
        reference = F.normalize(F.to_dtype(images[k].permute(2, 0, 1), torch.float32, scale=True), MEAN, STD)
        torch.testing.assert_close(out[k], reference, atol=2e-6, rtol=0)


def test_same_seed_same_batch_and_statistics_match_the_per_sample_path():
    images = _images(1, h=64, w=32).expand(512, -1, -1, -1).contiguous()
    a = BatchAugment("cpu", seed=3)(images)
    assert torch.equal(a, BatchAugment("cpu", seed=3)(images))
    assert not torch.equal(a, BatchAugment("cpu", seed=4)(images))
    torch.manual_seed(0)
    per_sample = train_augment((64, 32))
    b = torch.stack([per_sample(images[0].permute(2, 0, 1).float() / 255) for _ in range(512)])
    b = (b - CLIP_MEAN) / CLIP_STD
    # share of erased (exactly 0) and of padded (-mean/std) pixels agree within sampling noise
    for stat in (lambda x: x.eq(0).all(1).float().mean(), lambda x: x.lt(-1.45).all(1).float().mean()):
        assert stat(a).item() == pytest.approx(stat(b).item(), abs=0.03)


def test_rejects_anything_but_uint8_nhwc():
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment("cpu")(torch.zeros(2, 3, 16, 8))
