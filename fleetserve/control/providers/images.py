"""Container images fleetserve publishes, by backend and accelerator: what a cloud provider runs when a
spec names no `image`. The image's command is `fleetserve serve` with no arguments (everything comes
from env). Tags: `<version>-cpu` (CPU build of torch) and `<version>-cuda` (CUDA build, for GPU replicas)."""

from __future__ import annotations

from fleetserve import __version__

IMAGE_REPOSITORY = "ghcr.io/fleetserve/fleetserve"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cpu"  # the native backend on CPU
DEFAULT_GPU_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cuda"  # the native backend on NVIDIA GPUs
DEFAULT_IMAGES = {("native", False): DEFAULT_IMAGE, ("native", True): DEFAULT_GPU_IMAGE}


def default_image(backend: str = "native", gpu: bool = False) -> str:
    try:
        return DEFAULT_IMAGES[(backend, gpu)]
    except KeyError:
        raise ValueError(f"no default image for backend {backend!r}; set `image` in the spec") from None
