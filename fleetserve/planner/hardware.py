"""What GPUs this machine has (or the machine being planned for has).

Detection order: NVML (`nvidia-ml-py`, optional, imported lazily), then `nvidia-smi`, then "CPU
only". `synthetic_hardware("H100", 8)` describes a machine you are not on, from the table of known
GPUs, so `fleetserve plan --gpu-type H100 --gpus 8` works on a laptop.

Only plain data leaves this module: every detector returns a `Hardware`, and the parsers take text
so they are tested on recorded `nvidia-smi` outputs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

NVIDIA_SMI_QUERY = ["--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"]
# Drivers older than 510 do not know `compute_cap`: ask again without it and take it from the table.
NVIDIA_SMI_QUERY_OLD = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
IB_SYSFS = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class GPUType:
    """A known GPU model: what `--gpu-type` accepts and what detection recognises."""

    key: str  # canonical short name, e.g. "H100"
    name: str  # the name nvidia-smi prints for the common variant
    memory_mib: int  # memory.total as nvidia-smi reports it (a little under the marketing number)
    compute_capability: str
    interconnect: str  # "nvlink" (SXM boards) or "pcie"
    fp8: bool  # hardware FP8 tensor cores (sm89+)


# `--gpu-type` values (case-insensitive). The first entry of a family is what the bare family name
# means (A100 -> the 80 GB part).
KNOWN_GPUS: dict[str, GPUType] = {
    "H100": GPUType("H100", "NVIDIA H100 80GB HBM3", 81559, "9.0", "nvlink", True),
    "H100-PCIE": GPUType("H100", "NVIDIA H100 PCIe", 81559, "9.0", "pcie", True),
    "H100-NVL": GPUType("H100", "NVIDIA H100 NVL", 95830, "9.0", "nvlink", True),
    "H200": GPUType("H200", "NVIDIA H200", 143771, "9.0", "nvlink", True),
    "GH200": GPUType("GH200", "NVIDIA GH200 480GB", 97871, "9.0", "nvlink", True),
    "B200": GPUType("B200", "NVIDIA B200", 183359, "10.0", "nvlink", True),
    "A100": GPUType("A100", "NVIDIA A100-SXM4-80GB", 81920, "8.0", "nvlink", False),
    "A100-80GB": GPUType("A100", "NVIDIA A100-SXM4-80GB", 81920, "8.0", "nvlink", False),
    "A100-40GB": GPUType("A100", "NVIDIA A100-SXM4-40GB", 40960, "8.0", "nvlink", False),
    "L40S": GPUType("L40S", "NVIDIA L40S", 46068, "8.9", "pcie", True),
    "L4": GPUType("L4", "NVIDIA L4", 23034, "8.9", "pcie", True),
    "A10G": GPUType("A10G", "NVIDIA A10G", 23028, "8.6", "pcie", False),
    "T4": GPUType("T4", "Tesla T4", 15360, "7.5", "pcie", False),
    "V100": GPUType("V100", "Tesla V100-SXM2-16GB", 16160, "7.0", "nvlink", False),
}

# Family tokens looked for in a device name, most specific first ("GH200" before "H200", "A10G"
# before "A10", "L40S" before "L40" before "L4").
_FAMILIES = ["GH200", "B200", "H200", "H100", "A100", "A10G", "A10", "L40S", "L40", "L4", "T4", "V100"]
_FAMILY_CC = {"A10": "8.6", "L40": "8.9"}


class HardwareError(ValueError):
    """A hardware description that cannot be built (unknown GPU type, bad count)."""


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_mib: int
    compute_capability: str | None = None

    @property
    def family(self) -> str | None:
        return gpu_family(self.name)

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPU, ...] = ()
    source: str = "none"  # nvml | nvidia-smi | synthetic | none
    interconnect: str | None = None  # nvlink | pcie | None (not visible)
    ib_devices: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    @property
    def families(self) -> list[str]:
        return sorted({g.family or g.name for g in self.gpus})

    @property
    def family(self) -> str | None:
        """The GPU family when every GPU is the same kind (e.g. "H100"), else None."""
        fams = {g.family for g in self.gpus}
        return fams.pop() if len(fams) == 1 else None

    @property
    def all_h100(self) -> bool:
        return bool(self.gpus) and all(g.family == "H100" for g in self.gpus)

    @property
    def min_memory_mib(self) -> int:
        return min((g.memory_mib for g in self.gpus), default=0)

    @property
    def min_compute_capability(self) -> float | None:
        caps = [_cc(g.compute_capability) for g in self.gpus if g.compute_capability]
        return min(caps) if caps else None

    @property
    def fp8_capable(self) -> bool:
        cc = self.min_compute_capability
        return cc is not None and cc >= 8.9

    def describe(self) -> str:
        """In words, for messages: "8 x NVIDIA H100 80GB HBM3 (80 GiB, sm90)" or "no GPU (CPU only)"."""
        if not self.gpus:
            return "no GPU (CPU only)"
        groups: dict[tuple[str, int, str | None], int] = {}
        for g in self.gpus:
            key = (g.name, g.memory_mib, g.compute_capability)
            groups[key] = groups.get(key, 0) + 1
        parts = []
        for (name, mem, cc), n in groups.items():
            sm = f", sm{cc.replace('.', '')}" if cc else ""
            parts.append(f"{n} x {name} ({mem / 1024:.0f} GiB{sm})")
        return " + ".join(parts)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "count": self.count,
            "family": self.family,
            "interconnect": self.interconnect,
            "ib_devices": list(self.ib_devices),
            "gpus": [{"index": g.index, "name": g.name, "memory_mib": g.memory_mib,
                      "compute_capability": g.compute_capability, "family": g.family} for g in self.gpus],
            "notes": list(self.notes),
            "description": self.describe(),
        }


def _cc(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def gpu_family(name: str) -> str | None:
    """"NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA GH200 480GB" -> "GH200", unknown -> None."""
    upper = name.upper()
    for fam in _FAMILIES:
        if re.search(rf"(?<![A-Z0-9]){fam}(?![0-9A-Z])", upper):
            return fam
    return None


def known_gpu_type(value: str) -> GPUType:
    key = value.strip().upper().replace("_", "-").replace(" ", "-")
    key = {"H100-SXM": "H100", "H100-80GB": "H100", "A100-SXM4-80GB": "A100-80GB"}.get(key, key)
    if key not in KNOWN_GPUS:
        raise HardwareError(f"unknown GPU type {value!r}; known types: {', '.join(KNOWN_GPUS)}")
    return KNOWN_GPUS[key]


def synthetic_hardware(gpu_type: str, count: int) -> Hardware:
    """The hardware of a machine with `count` GPUs of a known type (for planning elsewhere)."""
    spec = known_gpu_type(gpu_type)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise HardwareError(f"GPU count must be a positive integer, got {count!r}")
    gpus = tuple(GPU(i, spec.name, spec.memory_mib, spec.compute_capability) for i in range(count))
    return Hardware(gpus=gpus, source="synthetic", interconnect=spec.interconnect if count > 1 else None,
                    notes=(f"described with --gpu-type {gpu_type} --gpus {count}, not detected",))


# ---------------------------------------------------------------- parsers (tested on recorded output)


def parse_nvidia_smi(text: str) -> list[GPU]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total[,compute_cap] --format=csv,noheader,nounits`.

    Tolerates a header line, units ("81559 MiB"), `[N/A]` / `[Not Supported]` fields and blank
    lines; a row that cannot be read raises ValueError naming it.
    """
    gpus: list[GPU] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.lower().startswith("name,") or line.lower().startswith("name "):
            continue
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 2:
            raise ValueError(f"unexpected nvidia-smi line (expected 'name, memory, compute_cap'): {raw!r}")
        name = cols[0]
        mem_text = re.sub(r"\s*MiB$", "", cols[1], flags=re.IGNORECASE)
        try:
            memory = int(float(mem_text))
        except ValueError:
            raise ValueError(f"unexpected memory.total {cols[1]!r} in nvidia-smi line {raw!r}") from None
        cc = cols[2] if len(cols) > 2 else ""
        if not re.fullmatch(r"\d+\.\d+", cc):
            cc = _table_cc(name)
        gpus.append(GPU(len(gpus), name, memory, cc))
    return gpus


def _table_cc(name: str) -> str | None:
    fam = gpu_family(name)
    if fam is None:
        return None
    if fam in _FAMILY_CC:
        return _FAMILY_CC[fam]
    return next((t.compute_capability for t in KNOWN_GPUS.values() if t.key == fam), None)


def parse_topology(text: str) -> str | None:
    """`nvidia-smi topo -m`: "nvlink" if any GPU pair is joined by NV#, "pcie" if pairs exist without, else None."""
    rows = [ln.split() for ln in text.splitlines() if re.match(r"^\s*GPU\d+\s", ln)]
    links = []
    for row in rows:
        links += [c for c in row[1:] if re.fullmatch(r"NV\d+|PIX|PXB|PHB|NODE|SYS", c)]
    if any(c.startswith("NV") for c in links):
        return "nvlink"
    return "pcie" if links else None


def visible_indices(env: Mapping[str, str]) -> list[int] | None:
    """CUDA_VISIBLE_DEVICES as integer indices; None when unset or not plain integers (e.g. UUIDs)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    value = value.strip()
    if value == "":
        return []
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    return None


def infiniband_devices(sysfs: Path = IB_SYSFS) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in sysfs.iterdir()))
    except OSError:
        return ()


# ---------------------------------------------------------------- detection


Runner = Callable[[Sequence[str]], str]  # runs argv, returns stdout; raises OSError/CalledProcessError


def _run(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, timeout=20).stdout


def detect_hardware(
    *,
    runner: Runner | None = None,
    use_nvml: bool = True,
    env: Mapping[str, str] | None = None,
    ib_sysfs: Path = IB_SYSFS,
) -> Hardware:
    """The GPUs of this machine: NVML, then nvidia-smi, else a CPU-only description (never raises)."""
    env = os.environ if env is None else env
    notes: list[str] = []
    hw: Hardware | None = None
    if use_nvml:
        hw = _detect_nvml(notes)
    if hw is None:
        hw = _detect_nvidia_smi(runner, notes)
    if hw is None:
        return Hardware(source="none", notes=tuple(notes) + ("no NVIDIA GPU found: planning for CPU only",))
    wanted = visible_indices(env)
    gpus = hw.gpus
    if wanted is not None:
        gpus = tuple(g for g in hw.gpus if g.index in wanted)
        gpus = tuple(replace(g, index=i) for i, g in enumerate(gpus))  # renumbered, as CUDA does
        notes.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')} leaves {len(gpus)} of "
                     f"{hw.count} GPU(s)")
    return replace(hw, gpus=gpus, ib_devices=infiniband_devices(ib_sysfs), notes=tuple(notes) + hw.notes)


def _detect_nvml(notes: list[str]) -> Hardware | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 -- no driver: fall through to nvidia-smi
        notes.append(f"NVML unavailable ({type(exc).__name__})")
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1 << 20))
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc = f"{major}.{minor}"
            except Exception:  # noqa: BLE001
                cc = _table_cc(name)
            gpus.append(GPU(i, name, memory, cc))
        interconnect = None
        if len(gpus) > 1:
            try:
                state = pynvml.nvmlDeviceGetNvLinkState(pynvml.nvmlDeviceGetHandleByIndex(0), 0)
                interconnect = "nvlink" if state else "pcie"
            except Exception:  # noqa: BLE001 -- boards without NVLink raise NotSupported
                interconnect = "pcie"
        return Hardware(gpus=tuple(gpus), source="nvml", interconnect=interconnect) if gpus else None
    except Exception as exc:  # noqa: BLE001
        notes.append(f"NVML query failed ({type(exc).__name__}: {exc})")
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _detect_nvidia_smi(runner: Runner | None, notes: list[str]) -> Hardware | None:
    if runner is None:
        if shutil.which("nvidia-smi") is None:
            return None
        runner = _run
    try:
        try:
            out = runner(["nvidia-smi", *NVIDIA_SMI_QUERY])
        except subprocess.CalledProcessError:
            out = runner(["nvidia-smi", *NVIDIA_SMI_QUERY_OLD])
        gpus = parse_nvidia_smi(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        notes.append(f"nvidia-smi failed ({type(exc).__name__}: {str(exc).strip()[:200]})")
        return None
    if not gpus:
        return None
    interconnect = None
    if len(gpus) > 1:
        try:
            interconnect = parse_topology(runner(["nvidia-smi", "topo", "-m"]))
        except (OSError, subprocess.SubprocessError):
            interconnect = None
    return Hardware(gpus=tuple(gpus), source="nvidia-smi", interconnect=interconnect)
