"""Container images fleetserve publishes, by backend: what a cloud provider runs when a spec names no
`image`. The image's command is `fleetserve serve` with no arguments (everything comes from env)."""

from __future__ import annotations

from fleetserve import __version__

IMAGE_REPOSITORY = "ghcr.io/fleetserve/fleetserve"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{__version__}-cpu"  # the native backend (CPU build of torch)
DEFAULT_IMAGES = {"native": DEFAULT_IMAGE}


def default_image(backend: str = "native") -> str:
    try:
        return DEFAULT_IMAGES[backend]
    except KeyError:
        raise ValueError(f"no default image for backend {backend!r}; set `image` in the spec "
                         f"(known: {', '.join(sorted(DEFAULT_IMAGES))})") from None
