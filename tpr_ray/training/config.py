"""What a training run is asked to do: ``TrainConfig``, shared by the driver and the workers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tpr_ray.methods.backbone import DEFAULT_IMAGE_SIZE


@dataclass
class TrainConfig:
    """Everything a training run needs; recipe overrides apply on top of the method's defaults."""

    method: str
    data: str
    out: str
    name: str | None = None
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    overrides: dict = field(default_factory=dict)
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    loader_workers: int = 2
    max_steps: int | None = None  # stop early (smoke tests, benchmarks)
    log_every: int = 20
    seed: int = 0
    holdout_fraction: float = 0.05
    resume: bool = False
    init: str | None = None  # start from this checkpoint's weights (same method), e.g. a stage-1 run
    start_stage: int = 0  # 0-based stage to begin with when not resuming (PD: 1 = stage 2 alone)
    max_failures: int = 0
    keep_checkpoints: int = 2
    bad_images: str = "fail"  # unreadable images: fail before training (listed), skip them, or "off" (no check)
    exclude_images: list[str] = field(default_factory=list)  # left out of training (the "skip" check fills it)
    mlflow: str | None = None  # MLflow tracking URI (default: MLFLOW_TRACKING_URI); TensorBoard files are always written
    mlflow_run_id: str | None = None  # filled by the driver
    grad_checkpointing: bool = False  # recompute activations in backward: less memory for large batches
    decoded_cache: str | None = None  # "auto" (beside the manifest) or a folder: train from decoded uint8 crops
    decoded_stream: bool = False  # with decoded_cache: stream it through Ray Data instead of loading it per worker

    def run_name(self) -> str:
        if self.name:
            return self.name
        base = os.path.basename(self.data.rstrip("/")).replace(".parquet", "") or "data"
        return f"{self.method}-{base}"
