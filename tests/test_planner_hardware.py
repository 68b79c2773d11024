"""Hardware detection: the nvidia-smi parser on recorded outputs, the fallbacks, synthetic machines."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fleetserve.planner.hardware import (
    GPU,
    Hardware,
    HardwareError,
    detect_hardware,
    gpu_family,
    parse_nvidia_smi,
    parse_topology,
    synthetic_hardware,
    visible_indices,
)

SMI = Path(__file__).parent / "fixtures" / "nvidia_smi"


def recorded(name: str) -> str:
    return (SMI / name).read_text()


def fake_runner(outputs: dict[str, str | Exception]):
    """A runner answering nvidia-smi calls from recorded files; the key is the joined argv."""
    calls: list[list[str]] = []

    def run(argv):
        calls.append(list(argv))
        key = " ".join(argv)
        for pattern, out in outputs.items():
            if pattern in key:
                if isinstance(out, Exception):
                    raise out
                return out
        raise FileNotFoundError(argv[0])

    run.calls = calls
    return run


def test_parse_eight_h100():
    gpus = parse_nvidia_smi(recorded("h100_sxm_x8.csv"))
    assert len(gpus) == 8
    assert [g.index for g in gpus] == list(range(8))
    assert {(g.name, g.memory_mib, g.compute_capability, g.family) for g in gpus} == {
        ("NVIDIA H100 80GB HBM3", 81559, "9.0", "H100")}


def test_parse_units_and_not_available_compute_cap():
    (gpu,) = parse_nvidia_smi(recorded("h100_pcie_units_na.csv"))
    assert gpu == GPU(0, "NVIDIA H100 PCIe", 81559, "9.0")  # [N/A] -> taken from the known-GPU table


def test_parse_header_and_two_columns_from_an_old_driver():
    gpus = parse_nvidia_smi(recorded("old_driver_header_no_cc.csv"))
    assert [(g.name, g.memory_mib, g.compute_capability, g.family) for g in gpus] == [
        ("NVIDIA L4", 23034, "8.9", "L4"), ("Tesla T4", 15360, "7.5", "T4")]


def test_parse_rejects_garbage_with_the_line():
    with pytest.raises(ValueError, match="couldn't communicate"):
        parse_nvidia_smi(recorded("no_driver.txt"))


@pytest.mark.parametrize("name, family", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H100 NVL", "H100"),
    ("NVIDIA H200", "H200"), ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"), ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA B200", "B200"), ("Tesla T4", "T4"), ("NVIDIA GeForce RTX 4090", None),
])
def test_gpu_family(name, family):
    assert gpu_family(name) == family


def test_topology():
    assert parse_topology(recorded("topo_h100_sxm_x8.txt")) == "nvlink"
    assert parse_topology(recorded("topo_l4_x2.txt")) == "pcie"
    assert parse_topology("") is None


def test_detect_with_nvidia_smi(tmp_path):
    (tmp_path / "mlx5_0").mkdir()
    (tmp_path / "mlx5_1").mkdir()
    run = fake_runner({"--query-gpu": recorded("h100_sxm_x8.csv"), "topo -m": recorded("topo_h100_sxm_x8.txt")})
    hw = detect_hardware(runner=run, use_nvml=False, env={}, ib_sysfs=tmp_path)
    assert hw.source == "nvidia-smi" and hw.count == 8 and hw.all_h100 and hw.family == "H100"
    assert hw.interconnect == "nvlink" and hw.ib_devices == ("mlx5_0", "mlx5_1")
    assert run.calls[0] == ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                            "--format=csv,noheader,nounits"]
    assert hw.describe() == "8 x NVIDIA H100 80GB HBM3 (80 GiB, sm90)"


def test_detect_retries_without_compute_cap_on_an_old_driver(tmp_path):
    err = subprocess.CalledProcessError(2, ["nvidia-smi"], output=recorded("old_driver_error.txt"))
    run = fake_runner({"compute_cap": err, "--query-gpu=name,memory.total": recorded("old_driver_header_no_cc.csv"),
                       "topo -m": recorded("topo_l4_x2.txt")})
    hw = detect_hardware(runner=run, use_nvml=False, env={}, ib_sysfs=tmp_path)
    assert [g.family for g in hw.gpus] == ["L4", "T4"] and hw.interconnect == "pcie" and not hw.all_h100
    assert hw.family is None and hw.families == ["L4", "T4"]


def test_cuda_visible_devices_limits_and_renumbers(tmp_path):
    run = fake_runner({"--query-gpu": recorded("a100_40gb_x4.csv"), "topo -m": ""})
    hw = detect_hardware(runner=run, use_nvml=False, env={"CUDA_VISIBLE_DEVICES": "1,3"}, ib_sysfs=tmp_path)
    assert [g.index for g in hw.gpus] == [0, 1] and hw.count == 2
    assert any("CUDA_VISIBLE_DEVICES=1,3" in n for n in hw.notes)
    assert visible_indices({"CUDA_VISIBLE_DEVICES": "GPU-8f3a,GPU-11aa"}) is None
    assert visible_indices({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.parametrize("outputs", [
    {},  # nvidia-smi missing
    {"--query-gpu": subprocess.CalledProcessError(9, ["nvidia-smi"], output=recorded("no_driver.txt"))},
    {"--query-gpu": recorded("no_driver.txt")},  # prints an error on stdout
    {"--query-gpu": ""},  # no GPU rows
])
def test_falls_back_to_cpu_only(outputs, tmp_path):
    hw = detect_hardware(runner=fake_runner(outputs), use_nvml=False, env={}, ib_sysfs=tmp_path)
    assert hw.cpu_only and hw.source == "none" and hw.count == 0
    assert hw.describe() == "no GPU (CPU only)"
    assert any("CPU only" in n for n in hw.notes)


def test_detect_on_this_machine_never_raises():
    hw = detect_hardware()
    assert isinstance(hw, Hardware)


@pytest.mark.parametrize("gpu_type, name, memory, cc", [
    ("H100", "NVIDIA H100 80GB HBM3", 81559, "9.0"),
    ("h200", "NVIDIA H200", 143771, "9.0"),
    ("A100", "NVIDIA A100-SXM4-80GB", 81920, "8.0"),
    ("A100-40GB", "NVIDIA A100-SXM4-40GB", 40960, "8.0"),
    ("L4", "NVIDIA L4", 23034, "8.9"),
    ("a10g", "NVIDIA A10G", 23028, "8.6"),
    ("B200", "NVIDIA B200", 183359, "10.0"),
])
def test_synthetic(gpu_type, name, memory, cc):
    hw = synthetic_hardware(gpu_type, 8)
    assert hw.count == 8 and hw.source == "synthetic"
    assert {(g.name, g.memory_mib, g.compute_capability) for g in hw.gpus} == {(name, memory, cc)}
    assert hw.all_h100 == (gpu_type.upper() == "H100")


def test_synthetic_rejects_unknown_type_and_bad_count():
    with pytest.raises(HardwareError, match="unknown GPU type 'RTX9000'; known types: H100"):
        synthetic_hardware("RTX9000", 1)
    with pytest.raises(HardwareError, match="positive integer"):
        synthetic_hardware("H100", 0)


def test_fp8_capability():
    assert synthetic_hardware("H100", 1).fp8_capable and synthetic_hardware("L4", 1).fp8_capable
    assert not synthetic_hardware("A100", 1).fp8_capable and not Hardware().fp8_capable
