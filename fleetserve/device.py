"""Pick the torch device and dtype for a worker.

torch is imported inside the functions so that importing this module (from the CLI's `--help` or
`--print-config`) stays cheap; only a real device check pays for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_FIXED_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _cuda_available(torch_mod) -> bool:
    # ROCm builds of torch expose their GPUs through torch.cuda as well.
    return bool(torch_mod.cuda.is_available())


def _mps_available(torch_mod) -> bool:
    mps = getattr(torch_mod.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def describe_machine() -> str:
    """What this machine offers torch, in words, for error messages."""
    import torch

    found = []
    if _cuda_available(torch):
        kind = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        found.append(f"{torch.cuda.device_count()} {kind} GPU(s) ({', '.join(names)})")
    if _mps_available(torch):
        found.append("Apple MPS")
    found.append("cpu")
    build = "CPU-only build" if not (torch.version.cuda or getattr(torch.version, "hip", None)) else "GPU build"
    return f"{', '.join(found)} (torch {torch.__version__}, {build})"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; an explicit device that is absent raises ``ValueError``."""
    import torch

    name = (name or "auto").strip().lower()
    kind, _, index = name.partition(":")
    if kind == "auto":
        if _cuda_available(torch):
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not _cuda_available(torch):
            raise ValueError(f"device 'cuda' was requested but this machine has no GPU torch can use; "
                             f"it has: {describe_machine()}. Use --device cpu or --device auto")
        if index:
            count = torch.cuda.device_count()
            if not index.isdigit() or int(index) >= count:
                raise ValueError(f"device {name!r} was requested but this machine has {count} CUDA device(s) "
                                 f"(cuda:0..cuda:{count - 1})")
        return torch.device(name)
    if kind == "mps":
        if not _mps_available(torch):
            raise ValueError(f"device 'mps' was requested but Apple MPS is not available here; "
                             f"this machine has: {describe_machine()}. Use --device cpu or --device auto")
        return torch.device("mps")
    raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps")


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """``auto``: fp32 on cpu, bf16 on cuda (fp16 where bf16 is unsupported), fp16 on mps."""
    import torch

    precision = (precision or "auto").strip().lower()
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if kind == "mps":
            return torch.float16
        return torch.float32
    if precision not in _FIXED_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; allowed: auto, fp32, bf16, fp16")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16 was requested but {torch.cuda.get_device_name(torch.device(device))} "
                         "does not support bfloat16; use --precision fp16 or auto")
    return getattr(torch, _FIXED_DTYPES[precision])
