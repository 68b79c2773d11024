"""The oneDNN-backed Linear every projection of the model is built on (the parallel layers included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.engine.native import cpu_kernels, fp8


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


class Linear(nn.Linear):
    """nn.Linear whose CPU matmuls go through oneDNN: measured 1.4x (batch 16) to 5x (batch 32) faster
    than the default BLAS path on this project's AMD CPUs (docs/perf.md), same results to fp32 rounding.

    `prepack()` reorders the weight once into oneDNN's blocked layout (another 25-35% at batch 16, since
    the plain path reorders on every call). `prepack(torch.bfloat16)` packs a bf16 copy of an fp32 weight
    instead: the matmul then rounds its input to bf16, accumulates in fp32 and returns the input's dtype
    (the CPU's bf16 mode, see loader.activation_dtype). An fp32 weight that is exactly low-bit (a GGUF Q8_0
    or Q4_1 dequantisation, see cpu_kernels.pack_lowbit) is kept in that compact form instead and multiplied
    by the C kernel: the same products from 1.25 bytes a weight instead of 4.
    """

    packed: torch.Tensor | None = None
    matmul_dtype: torch.dtype | None = None  # set when the packed weight's dtype differs from the activations'
    packed_bias: torch.Tensor | None = None
    lowbit: cpu_kernels.LowBitWeight | None = None
    qweight: torch.Tensor | None = None  # FP8 weight and its per-channel scale (fp8.py)
    w_scale: torch.Tensor | None = None

    def prepack(self, matmul_dtype: torch.dtype | None = None, batch_hint: int = 16) -> None:
        if self.qweight is not None or not (
                _ONEDNN and self.weight.device.type == "cpu" and self.weight.dtype in _ONEDNN_DTYPES):
            return
        weight, bias = self.weight.detach(), self.bias
        if matmul_dtype is None and weight.dtype == torch.float32 and cpu_kernels.load() is not None:
            self.lowbit = cpu_kernels.pack_lowbit(weight)
            if self.lowbit is not None:  # the fp32 copy is no longer read (a tied embedding keeps its own)
                self.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
                return
        if matmul_dtype is not None and matmul_dtype != weight.dtype:
            self.matmul_dtype = matmul_dtype
            weight = weight.to(matmul_dtype)
            self.packed_bias = None if bias is None else bias.detach().to(matmul_dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)

    def quantize_fp8(self) -> bool:
        if not fp8.fp8_supported(self.in_features, self.out_features):
            return False
        self.qweight, self.w_scale = fp8.quantize_weight(self.weight.detach())
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)  # the fp8 copy replaces it
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return fp8.fp8_linear(x, self.qweight, self.w_scale, self.bias)
        if self.lowbit is not None:
            y = cpu_kernels.lowbit_linear(x, self.lowbit)
            return y if self.bias is None else y + self.bias
        if self.matmul_dtype is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.matmul_dtype), self.packed, self.packed_bias, "none", [], "")
            return y.to(x.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
