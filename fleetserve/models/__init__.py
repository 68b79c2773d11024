"""Model resolution: from a spec ("default", a path, a Hub id) to files on disk."""

from fleetserve.models.resolve import (
    DEFAULT_MODEL_NAME,
    ModelFiles,
    ModelResolutionError,
    default_model_file,
    fleetserve_home,
    model_cache_dir,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelFiles",
    "ModelResolutionError",
    "default_model_file",
    "fleetserve_home",
    "model_cache_dir",
    "resolve_model",
]
