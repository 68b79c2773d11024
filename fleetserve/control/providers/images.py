"""Container images fleetserve publishes, by backend and accelerator: what a cloud provider runs when a
spec names no `image`. Each image's entrypoint is `fleetserve serve` (with `--backend B` for a GPU engine
backend) and everything else comes from env. Tags: `<version>-cpu` (docker/Dockerfile.cpu: CPU torch, the
embedded default model baked in), `<version>-sglang` (docker/Dockerfile.sglang: on the official SGLang
image) and `<version>-cuda` (the native engine's CUDA build; no Dockerfile in this repository yet).
README.md "Container images" has the build and run lines; tests/test_dockerfiles.py keeps them in step."""

from __future__ import annotations

from fleetserve import __version__

IMAGE_REPOSITORY = "ghcr.io/fleetserve/fleetserve"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cpu"  # the native backend on CPU
DEFAULT_GPU_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cuda"  # the native backend on NVIDIA GPUs
SGLANG_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-sglang"  # the sglang backend (NVIDIA GPUs only)
DEFAULT_IMAGES = {("native", False): DEFAULT_IMAGE, ("native", True): DEFAULT_GPU_IMAGE,
                  ("sglang", True): SGLANG_IMAGE}
# where each published image is built from (build context: the repository root)
DOCKERFILES = {DEFAULT_IMAGE: "docker/Dockerfile.cpu", SGLANG_IMAGE: "docker/Dockerfile.sglang"}


def default_image(backend: str = "native", gpu: bool = False) -> str:
    try:
        return DEFAULT_IMAGES[(backend, gpu)]
    except KeyError:
        raise ValueError(f"no default image for backend {backend!r}" + (" without GPUs" if not gpu else "")
                         + "; set `image` in the spec") from None
