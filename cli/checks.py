"""Checks that run before Ray starts, so that a mistake costs a second and one line, not a
cluster start and a traceback from inside a worker."""

from __future__ import annotations

import os

import click

from tpr_ray.errors import ConfigError

_STORAGE_HINT = ("set AWS_PROFILE or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (on a cluster: the nodes' instance "
                 "role), and for MinIO / Ceph the endpoint with --endpoint-url or AWS_ENDPOINT_URL")


def _storage_failure(uri: str, option: str, error: Exception) -> ConfigError:
    name = type(error).__name__
    if "Credentials" in name or "AccessDenied" in str(error)[:200] or isinstance(error, PermissionError):
        return ConfigError(f"{option} {uri}: no access (missing or invalid credentials): {_STORAGE_HINT}")
    if "Endpoint" in name or "Connect" in name or isinstance(error, (ConnectionError, TimeoutError)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        where = f"endpoint {endpoint}" if endpoint else "the object store"
        return ConfigError(f"{option} {uri}: cannot reach {where} ({name}); check --endpoint-url / "
                           f"AWS_ENDPOINT_URL and the network")
    return ConfigError(f"{option} {uri}: cannot be read ({name}: {str(error).splitlines()[0][:200]})")


def must_exist(uri: str, option: str) -> None:
    """``uri`` (local path or URI) exists and this process may read it."""
    from tpr_ray.io import storage
    try:
        found = storage.exists(uri)
    except Exception as error:  # botocore / s3fs / fsspec raise many kinds
        raise _storage_failure(uri, option, error) from error
    if not found:
        raise ConfigError(f"{option} {uri} does not exist")
    if not storage.is_remote(uri) and not os.access(uri, os.R_OK):
        raise ConfigError(f"{option} {uri} is not readable by this user")


class ExistingUri(click.ParamType):
    """A path or URI that must exist when the command starts."""

    name = "PATH|URI"

    def convert(self, value, param, ctx):
        option = param.opts[0] if param is not None and param.opts else "path"
        try:
            must_exist(value, option)
        except ConfigError as error:
            self.fail(str(error).removeprefix(f"{option} "), param, ctx)
        return value


def model_and_weights(model: str, pretrained: str | None) -> None:
    """open_clip can build ``model`` with ``pretrained`` (a tag it knows, a local file, a
    tpr-ray checkpoint, or None for random weights)."""
    import open_clip

    import tpr_ray.methods.backbone  # noqa: F401  (registers tpr-tiny)

    if model not in open_clip.list_models():
        raise ConfigError(f"unknown --model {model!r}; use an open_clip architecture such as ViT-B-16 "
                          f"(open_clip.list_models()), or tpr-tiny for tests")
    if not pretrained or pretrained.startswith("hf-hub:"):
        return
    from tpr_ray.io import storage
    if os.sep in pretrained or "://" in pretrained or os.path.exists(pretrained) or \
            pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        must_exist(pretrained, "--pretrained")
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained in tags:
        from tpr_ray.methods.weights_cache import check_weights_obtainable

        check_weights_obtainable(model, pretrained)  # offline and not cached: now, not in a worker
        return
    if storage.exists(pretrained):
        return
    if tags:
        raise ConfigError(f"open_clip has no {pretrained!r} weights for {model}; use one of {', '.join(tags)}, "
                          f"a local checkpoint file, or --pretrained none (random weights)")
    raise ConfigError(f"{model} has no pretrained weights in open_clip; pass --pretrained none (random weights) "
                      f"or a checkpoint file of your own")
