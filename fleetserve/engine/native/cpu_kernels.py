"""C kernels for the CPU path (csrc/), built on first use with the machine's C compiler and called with ctypes.

Why C and ctypes rather than a torch C++ extension: the kernels need no torch headers, so they compile in
well under a second (a torch extension takes ~30 s on two cores), and ctypes releases the GIL while they run.
The shared object is cached under ``~/.cache/fleetserve/kernels`` (``$FLEETSERVE_KERNEL_CACHE``; a read-only
home falls back to the temp folder), named by a hash of the source, the compiler, its flags and the CPU;
concurrent builds (several replicas starting at once) each write their own temporary file and rename it into
place. Without a compiler `load()` says why, and the engine keeps to PyTorch: SDPA attention, torch
elementwise ops and oneDNN matmuls over fp32 weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
# -ffast-math: vectorised reductions and expf; the kernels keep every value finite (the softmax max starts
# from the first score), so finite-math-only changes nothing. -march=native: the build runs where it is used.
# Compiled and linked in two steps: gcc links crtfastmath.o into a library *linked* with -ffast-math, and
# loading that sets flush-to-zero for the whole process (every later float op would lose subnormals).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-std=gnu11", "-pthread"]
LDFLAGS = ["-shared", "-pthread"]
KV_DTYPES = (torch.float32, torch.bfloat16)  # the KV caches the attention kernel reads
DEFAULT_SPIN_US = 200

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def spin_us() -> int:
    """How long (microseconds) an idle helper thread of the kernels' pool spins before it sleeps: long enough
    to bridge the gaps between the kernels of one decode step, short enough to give the cores back between
    steps. ``$FLEETSERVE_KERNEL_SPIN_US``; 0 sleeps at once."""
    raw = os.environ.get("FLEETSERVE_KERNEL_SPIN_US", "")
    try:
        return max(0, int(raw)) if raw else DEFAULT_SPIN_US
    except ValueError:
        raise ValueError(f"FLEETSERVE_KERNEL_SPIN_US must be a whole number of microseconds, not {raw!r}") from None


def _cache_dirs() -> list[Path]:
    """Where a build may go, in order: a read-only home (a locked-down container) falls back to /tmp."""
    configured = os.environ.get("FLEETSERVE_KERNEL_CACHE")
    if configured:
        return [Path(configured)]
    return [Path.home() / ".cache" / "fleetserve" / "kernels",
            Path(tempfile.gettempdir()) / f"fleetserve-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def _compiler() -> str | None:
    configured = os.environ.get("CC")
    if configured:
        return shutil.which(configured) or None
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _cpu_signature() -> str:
    """-march=native code runs only on CPUs like the one that built it: a shared home must not mix them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *CFLAGS, *LDFLAGS, _cpu_signature()]).encode())
    name = f"cpu_kernels-{key.hexdigest()[:16]}.so"
    for folder in _cache_dirs():
        if (folder / name).exists():
            return folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            break
        except OSError as exc:
            error = exc
    else:
        raise error
    os.close(fd)
    target = folder / name
    try:
        for argv in ([cc, *CFLAGS, "-c", "-o", tmp + ".o", str(SOURCE)],
                     [cc, *LDFLAGS, "-o", tmp, tmp + ".o", "-lm"]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        for path in (tmp, tmp + ".o"):
            if os.path.exists(path):
                os.unlink(path)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (`load_error()` says why)."""
    global _lib, _error
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        cc = _compiler()
        try:
            if cc is None:
                raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
            lib = ctypes.CDLL(str(_build(cc)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _error = str(exc) if cc is None else f"{type(exc).__name__}: {exc}"
            log.warning("CPU kernels unavailable, using the PyTorch path: %s", _error)
            return None
        ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        i64 = ctypes.c_long
        _signature(lib.fs_paged_decode, ctypes.c_int, [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i32, ptr, i32, ptr]
                   + [i32] * 5 + [f32, i32, ptr])
        _signature(lib.fs_rms_norm, None, [ptr, ptr, ptr, i32, i32, f32])
        _signature(lib.fs_silu_mul, None, [ptr, ptr, i32, i32])
        _signature(lib.fs_rope, None, [ptr, ctypes.c_long, i32, i32, i32, ptr, ptr])
        _signature(lib.fs_lowbit_gemm, ctypes.c_int, [ptr, i32, i32, ptr, ptr, i32, ptr, i32])
        _signature(lib.fs_decode_layers, i32, [ctypes.POINTER(_Step)])
        _signature(lib.fs_pool_start, i32, [i32, ctypes.c_long])
        _signature(lib.fs_pool_stop, None, [])
        lib.fs_pool_start(torch.get_num_threads(), spin_us())
        _lib = lib
        return _lib


def _signature(fn, restype, argtypes) -> None:
    fn.restype, fn.argtypes = restype, argtypes


def load_error() -> str | None:
    load()
    return _error


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H, D] whose heads are contiguous within a row (rows may be apart: views of the fused qkv)."""
    t = t.float()
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int | None,
                     k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence ([B, Hq, D]) against its blocks of a [blocks, block_size, Hkv, D] cache.
    block_tables [B, max_blocks] and context_lens [B] are contiguous int32 on the CPU. With k_new and v_new
    ([B, Hkv, D]) the kernel first writes each sequence's new K and V at its last position (the store and the
    attention in one pass over the sequences)."""
    lib = _kernels()
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    qf = _rows(q)
    out = torch.empty(b, hq, d)
    new = [None, 0, None, 0]
    if k_new is not None:
        k_new, v_new = _rows(k_new), _rows(v_new)
        new = [k_new.data_ptr(), k_new.stride(0), v_new.data_ptr(), v_new.stride(0)]
    rc = lib.fs_paged_decode(qf.data_ptr(), qf.stride(0), *new,
                             k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
                             block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), b, hq, hkv, d,
                             block_size, scale, sliding_window or 0, out.data_ptr())
    if rc != 0:
        raise MemoryError("CPU decode attention could not allocate its score buffer")
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def _kernels() -> ctypes.CDLL:
    """The library in a process that has not loaded it yet (a tensor-parallel worker) is built or loaded now;
    rank 0 resolved the backend, so it is there."""
    lib = _lib if _lib is not None else load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not available in this process: {_error}")
    return lib


# ---- the fused per-layer ops of the fp32 CPU path (model.py uses them when the step's backend is "cpu") ----


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    assert x.dtype == weight.dtype == torch.float32 and weight.is_contiguous()
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    _kernels().fs_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [T, 2 * inter] rows laid out [gate | up] (the fused gate_up projection's output)."""
    assert gate_up.is_contiguous() and gate_up.dtype == torch.float32
    rows, width = gate_up.shape
    out = gate_up.new_empty(rows, width // 2)
    _kernels().fs_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
    return out


def rope_(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates the first `heads` heads of each row of a contiguous [T, H, D] tensor in place."""
    t, _, d = qkv.shape
    assert qkv.stride(2) == 1 and qkv.stride(1) == d and qkv.dtype == cos.dtype == sin.dtype == torch.float32
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape == (t, d)
    _kernels().fs_rope(qkv.data_ptr(), qkv.stride(0), t, heads, d, cos.data_ptr(), sin.data_ptr())


# ---- weights that are exactly low-bit (GGUF Q8_0 / Q4_1 dequantised): kept compact, same products ----


@dataclass
class LowBitWeight:
    """A [N, K] fp32 weight that is exactly d * q + m per 32 inputs, as the kernel reads it: int8 q
    [NP, K, 16] and fp32 d, m [NP, K / 32, 2, 16] in panels of 16 output columns (N padded with zeros)."""

    q: torch.Tensor
    dm: torch.Tensor
    out_features: int
    in_features: int


def pack_lowbit(w: torch.Tensor) -> LowBitWeight | None:
    """The compact form of `w` when it is exactly a GGUF Q8_0 (d * q, |q| <= 127) or Q4_1 (d * q + m,
    0 <= q <= 15, m the block's minimum) dequantisation with fp16 d and m, checked bit for bit; else None.
    fp16 d times an 8-bit q is exact in fp32, so the kernel's d * q + m is the weight itself."""
    n, k = w.shape
    if k % 32 or w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    blocks = w.detach().reshape(n, k // 32, 32)

    def exact(d: torch.Tensor, m: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
        if not (torch.equal(d.half().float(), d) and torch.equal(m.half().float(), m)):
            return None
        dd, mm = d[..., None], m[..., None]
        q = torch.round((blocks - mm) / torch.where(dd == 0, 1.0, dd)).clamp(lo, hi)
        return q if torch.equal(dd * q + mm, blocks) else None

    lo, hi = torch.aminmax(blocks, dim=-1)  # one pass for both forms
    d = torch.maximum(-lo, hi) / 127
    m = torch.zeros_like(d)
    q = exact(d, m, -127, 127)
    if q is None:
        m = lo
        d = ((hi - lo) / 15).half().float()
        q = exact(d, m, 0, 15)
        if q is None:
            return None
    panels = -(-n // 16)
    pad = panels * 16 - n
    q = F.pad(q.to(torch.int8).reshape(n, k), (0, 0, 0, pad)).view(panels, 16, k).transpose(1, 2).contiguous()
    d, m = (F.pad(t, (0, 0, 0, pad)).view(panels, 16, k // 32).transpose(1, 2) for t in (d, m))
    return LowBitWeight(q, torch.stack([d, m], dim=2).contiguous(), n, k)


def lowbit_linear(x: torch.Tensor, w: LowBitWeight) -> torch.Tensor:
    assert x.dtype == torch.float32 and x.shape[-1] == w.in_features
    x2 = x.reshape(-1, w.in_features).contiguous()
    y = x2.new_empty(x2.shape[0], w.out_features)
    rc = _kernels().fs_lowbit_gemm(x2.data_ptr(), x2.shape[0], w.in_features, w.q.data_ptr(), w.dm.data_ptr(),
                                   w.q.shape[0], y.data_ptr(), w.out_features)
    if rc != 0:
        raise MemoryError("low-bit GEMM could not allocate its input buffer")
    return y.view(*x.shape[:-1], w.out_features)


# ---- a whole decode step's decoder layers in one call (fs_decode_layers) ----


class _LowBit(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("dm", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("N", ctypes.c_int), ("K", ctypes.c_int), ("NP", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("qkv", _LowBit), ("o", _LowBit), ("gate_up", _LowBit), ("down", _LowBit)]


class _Step(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("num_layers", "M", "hidden", "hq", "hkv", "d", "inter",
                                                   "block_size", "bt_stride", "window", "kv_bf16")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)),
        ("k_caches", ctypes.POINTER(ctypes.c_void_p)), ("v_caches", ctypes.POINTER(ctypes.c_void_p)),
        ("block_tables", ctypes.c_void_p), ("context_lens", ctypes.c_void_p),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("x", ctypes.c_void_p)]


@dataclass
class LayerWeights:
    """One decoder layer as fs_decode_layers reads it: fp32 RMSNorm weights and four exactly-low-bit
    linears (q/k/v fused, o, gate/up fused, down), each with its bias or None."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    linears: list[tuple[LowBitWeight, torch.Tensor | None]]


class DecodeLayers:
    """Every decoder layer of a pure decode step in one C call: the kernels the layer-by-layer path calls,
    in the same order, so the same results bit for bit, without ~15 Python-level ops a layer (a sixth of a
    batch-16 decode step). Holds the tensors it points at."""

    def __init__(self, layers: list[LayerWeights], *, hq: int, hkv: int, d: int, inter: int, eps: float,
                 scale: float, window: int | None):
        self._keep = layers
        self._layers = (_Layer * len(layers))()
        for dst, lw in zip(self._layers, layers):
            dst.input_norm, dst.post_norm = lw.input_norm.data_ptr(), lw.post_norm.data_ptr()
            for field, (w, bias) in zip(("qkv", "o", "gate_up", "down"), lw.linears):
                setattr(dst, field, _LowBit(w.q.data_ptr(), w.dm.data_ptr(), None if bias is None else bias.data_ptr(),
                                            w.out_features, w.in_features, w.q.shape[0]))
        self.hidden = layers[0].input_norm.numel()
        self._shape = dict(hq=hq, hkv=hkv, d=d, inter=inter, eps=eps, scale=scale, window=window or 0)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_caches, block_tables: torch.Tensor,
            context_lens: torch.Tensor) -> None:
        """x [M, hidden] (contiguous fp32, the residual stream) is updated in place; one query token per row."""
        m = x.shape[0]
        assert x.is_contiguous() and x.dtype == torch.float32 and x.shape[1] == self.hidden
        assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape == (m, self._shape["d"])
        n = len(kv_caches)
        k_cache = kv_caches[0][0]
        step = _Step(num_layers=n, M=m, hidden=self.hidden, block_size=k_cache.shape[1], bt_stride=block_tables.shape[1],
                     kv_bf16=int(k_cache.dtype == torch.bfloat16), layers=self._layers,
                     k_caches=(ctypes.c_void_p * n)(*(k.data_ptr() for k, _ in kv_caches)),
                     v_caches=(ctypes.c_void_p * n)(*(v.data_ptr() for _, v in kv_caches)),
                     block_tables=block_tables.data_ptr(), context_lens=context_lens.data_ptr(),
                     cos=cos.data_ptr(), sin=sin.data_ptr(), x=x.data_ptr(), **self._shape)
        if _kernels().fs_decode_layers(ctypes.byref(step)) != 0:
            raise MemoryError("the CPU decode step could not allocate its buffers")
