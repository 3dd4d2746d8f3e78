"""Published text-to-image results (R@1, R@5, R@10, mAP in %) that `tpr-ray reproduce` compares with.

Keys are the dataset formats of ``tpr_ray.data.FORMATS``; None marks a number the paper does
not report. PD reports no numbers for this setting, so it is compared with the baseline's.
"""

from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    source: str
    results: dict[str, dict[str, float | None]]  # dataset format -> metric -> value


METRICS = ("R1", "R5", "R10", "mAP")


def _row(r1, r5, r10, map_) -> dict[str, float | None]:
    return dict(zip(METRICS, (r1, r5, r10, map_)))


FINE_TUNED_CLIP = Published(
    "CLIP ViT-B/16 fully fine-tuned (the baseline row of the CSKT and IRRA comparisons)",
    {"cuhk": _row(68.19, 86.47, 91.47, 61.12), "icfg": _row(56.74, None, None, 31.84),
     "rstp": _row(54.05, None, None, 43.41)},
)

PUBLISHED: dict[str, Published] = {
    "baseline": FINE_TUNED_CLIP,
    "cskt": Published("CSKT, Liu et al., ICASSP 2024",
                      {"cuhk": _row(69.70, 86.92, 91.80, 62.74), "icfg": _row(58.90, 77.31, 83.56, 33.87),
                       "rstp": _row(57.75, 81.30, 88.35, 46.43)}),
    "cfine": Published("CFine, Yan et al., IEEE TIP 2023",
                       {"cuhk": _row(69.57, 85.93, 91.15, None), "icfg": _row(60.83, 76.55, 82.42, None),
                        "rstp": _row(50.55, 72.50, 81.60, None)}),
    "pd": Published(f"no published numbers for PD in this setting; shown: {FINE_TUNED_CLIP.source}",
                    FINE_TUNED_CLIP.results),
}

# For reference: IRRA (with its MLM head), Jiang & Ye, CVPR 2023.
IRRA = Published("IRRA, CVPR 2023", {"cuhk": _row(73.38, 89.93, 93.71, 66.13), "icfg": _row(63.46, 80.24, 85.82, 38.05),
                                     "rstp": _row(60.20, 81.30, 88.20, 47.17)})


def published(method: str, dataset: str) -> tuple[str, dict[str, float | None]]:
    """(source, {metric: value}) for ``method`` on ``dataset``; empty values when unknown."""
    entry = PUBLISHED.get(method)
    if entry is None:
        return f"no published numbers for {method}", dict.fromkeys(METRICS)
    return entry.source, entry.results.get(dataset, dict.fromkeys(METRICS))
