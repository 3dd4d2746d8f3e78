"""Where open_clip keeps a pretrained tag's weights, and whether a run can get them.

open_clip downloads a tag's weights the first time a model is built with it: from the
Hugging Face hub when the tag names a hub repository (and huggingface_hub is installed),
else from the tag's URL into ~/.cache/clip. A machine without network (or with
HF_HUB_OFFLINE=1) finds out only when a training worker builds the model, a minute into
the job; :func:`check_weights_obtainable` finds out before any work starts.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from tpr_ray.errors import ConfigError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_SECONDS = 3.0  # the reachability probe never holds a command up longer than this
# open_clip's names for a hub repository's weights, in the order it tries them
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, resolved from the environment as huggingface_hub does."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def url_cache_dir() -> str:
    return os.path.expanduser("~/.cache/clip")  # open_clip's download_pretrained_from_url


def _hub_files(filename: str) -> tuple[str, ...]:
    if not filename:
        return HUB_WEIGHT_FILES
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def weights_source(model: str, tag: str) -> dict:
    """{"url": where the weights come from, "cache": the local cache folder, "cached": the
    cached file or None} for an open_clip pretrained ``tag`` of ``model``; {} when open_clip
    has no such tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        return {}
    if cfg.get("file"):
        return {"url": cfg["file"], "cache": os.path.dirname(cfg["file"]),
                "cached": cfg["file"] if os.path.isfile(cfg["file"]) else None}
    hub = cfg.get("hf_hub", "")
    if hub and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)  # "org/name/" means open_clip's default file names
        cache = hub_cache_dir()
        for name in _hub_files(filename):
            found = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(found, str):
                return {"url": f"{constants.ENDPOINT}/{repo}", "cache": cache, "cached": found}
        return {"url": f"{constants.ENDPOINT}/{repo}", "cache": cache, "cached": None}
    url = cfg.get("url", "")
    target = os.path.join(url_cache_dir(), os.path.basename(url))
    return {"url": url, "cache": url_cache_dir(), "cached": target if os.path.isfile(target) else None}


def offline_variable() -> str | None:
    """The variable that switches downloads off, if one is set."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true"):
            return name
    return None


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """An HTTP server answers a HEAD request for ``url`` within ``timeout`` seconds (any status:
    a bare TCP connection proves nothing behind a proxy that accepts every connection)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):  # URLError, timeouts, refused connections, a malformed URL
        return False
    return True


def check_weights_obtainable(model: str, tag: str) -> None:
    """open_clip will find ``model``'s ``tag`` weights: in the local cache, or by download.
    Raises ConfigError naming the tag, the cache and what to do otherwise."""
    source = weights_source(model, tag)
    if not source or source["cached"]:
        return
    blocker = offline_variable()
    if blocker:
        why = f"{blocker}={os.environ[blocker]} is set"
    elif reachable(source["url"]):
        return
    else:
        why = f"{urlparse(source['url']).hostname} cannot be reached"
    raise ConfigError(
        f"--pretrained {tag}: the {model} weights are not in the local cache {source['cache']} and {why}; "
        f"pass a local weights file (--pretrained /path/to/open_clip_model.safetensors), or run once with "
        f"network to fill the cache")
