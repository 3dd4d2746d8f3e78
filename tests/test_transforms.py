"""Batched augmentation of uint8 batches: each image is a flip, a crop of its padded self and an
erased rectangle, checked image by image against a brute-force search over those choices."""

import torch

from tpr_ray.transforms import CLIP_MEAN, CLIP_STD, batch_augment, normalize

H, W, PAD = 12, 8, 3


def _images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, H, W, 3), dtype=torch.uint8, generator=g)  # no zeros: padding is visible


def _unnormalise(x):
    return x * CLIP_STD + CLIP_MEAN


def test_flip_only_gives_each_image_or_its_mirror_and_both_occur():
    images = _images()
    out = batch_augment(images, pad=0, erase_p=0.0, generator=torch.Generator().manual_seed(1))
    plain, mirrored = normalize(images), normalize(images).flip(-1)
    same = [torch.allclose(o, p, atol=1e-6) for o, p in zip(out, plain)]
    flipped = [torch.allclose(o, m, atol=1e-6) for o, m in zip(out, mirrored)]
    assert all(s or f for s, f in zip(same, flipped))
    assert any(same) and any(flipped)


def test_each_image_is_a_crop_of_its_zero_padded_self():
    images = _images()
    out = _unnormalise(batch_augment(images, pad=PAD, erase_p=0.0, generator=torch.Generator().manual_seed(2)))
    offsets = set()
    for img, o in zip(images, out):
        x = img.permute(2, 0, 1).float() / 255.0
        found = None
        for candidate in (x, x.flip(-1)):
            padded = torch.nn.functional.pad(candidate, (PAD, PAD, PAD, PAD))
            for top in range(2 * PAD + 1):
                for left in range(2 * PAD + 1):
                    if torch.allclose(padded[:, top:top + H, left:left + W], o, atol=1e-5):
                        found = (top, left)
        assert found is not None
        offsets.add(found)
    assert len(offsets) > 4  # offsets vary across the batch


def test_erasing_fills_one_rectangle_of_the_right_size_with_the_mean():
    images = _images(n=64)
    out = _unnormalise(batch_augment(images, pad=0, erase_p=1.0, generator=torch.Generator().manual_seed(3)))
    erased = 0
    for img, o in zip(images, out):
        x = img.permute(2, 0, 1).float() / 255.0
        x = max((x, x.flip(-1)), key=lambda c: int(torch.isclose(o, c, atol=1e-5).all(0).sum()))  # its orientation
        changed = ~torch.isclose(o, x, atol=1e-5).all(0)
        if not changed.any():
            continue  # the drawn box did not fit (as torchvision, which then leaves the image)
        erased += 1
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = o[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert torch.allclose(box, CLIP_MEAN.view(3, 1, 1).expand_as(box), atol=1e-5)  # one solid rectangle
        area = box.shape[1] * box.shape[2] / (H * W)
        assert 0.0 < area <= 0.6  # scale 0.02..0.4, rounding of side lengths on a small image
    assert erased > 16
