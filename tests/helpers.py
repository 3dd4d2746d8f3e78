"""Constants and small helpers shared by test modules (fixtures live in conftest.py)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = {"model": "tpr-tiny", "pretrained": None}

# The tiny model from scratch needs a from-scratch learning rate (see tpr_ray/workflows/demo.py).
SOURCE_RECIPE = {"lr": 1e-3, "batch_size": 32, "epochs": 10, "warmup_epochs": 1, "weight_decay": 1e-4}

# moto's S3 server on loopback: the endpoint and dummy credentials (moto accepts any).
S3_PORT = free_port()
S3_BUCKET = "tpr-test"
S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "tpr-test-key-id",
          "AWS_SECRET_ACCESS_KEY": "tpr-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def save_tiny_checkpoint(path: str, seed: int = 0, num_classes: int = 3, meta: dict | None = None) -> str:
    """A tpr-tiny baseline with seeded random weights, saved as a checkpoint at ``path``."""
    import torch

    from tpr_ray.methods.backbone import BackboneConfig
    from tpr_ray.model.checkpoint import save_checkpoint
    from tpr_ray.methods import get_method

    torch.manual_seed(seed)
    cls = get_method("baseline")
    save_checkpoint(cls(BackboneConfig(**TINY), cls.default_recipe, num_classes), path, meta or {})
    return path
