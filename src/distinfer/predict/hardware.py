"""What the performance model knows of the hardware: links between ranks, and the speed of one rank's device.

GPU ranks take their profile's datasheet figures (profiles.py). CPU ranks take a probe of this machine
(probe.py): matrix products and reads of working sets from cache size to main memory, at one thread and at every
core, so that a rank given k of the machine's cores gets what k cores measured. A hardware file (YAML or JSON) may define or override a profile's
figures: name, peak_flops {dtype: FLOP/s}, memory_bandwidth (bytes/s), launch_s, node_link, network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError

from distinfer.profiles import HARDWARE, HardwareProfile

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Link:
    """One direction of a link: bytes/s and the latency of one message (software stack included)."""

    name: str
    bandwidth: float
    latency_s: float
    source: str

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


LINKS = {
    link.name: link
    for link in (
        Link("same-machine", 10e9, 30e-6, "CPU ranks of one machine: shared memory; on CPU profiles the probe's "
             "hand-off and read bandwidth replace these figures"),
        Link("pcie", 12e9, 15e-6, "PCIe Gen3 x16: 15.75 GB/s raw, ~12 GB/s achieved device to device (assumed)"),
        Link("nvlink", 300e9, 10e-6, "NVLink 3 (A100): 600 GB/s both directions, 300 GB/s one way"),
        Link("10gbe", 1.25e9, 50e-6, "10 Gb/s Ethernet, TCP (NCCL/gloo sockets): latency assumed"),
        Link("25gbe", 3.125e9, 40e-6, "25 Gb/s Ethernet, TCP: latency assumed"),
        Link("100gbe", 12.5e9, 30e-6, "100 Gb/s Ethernet, TCP: latency assumed"),
        Link("infiniband", 25e9, 5e-6, "InfiniBand HDR 200 Gb/s with RDMA: latency assumed"),
    )
}
NETWORKS = ("10gbe", "25gbe", "100gbe", "infiniband")


Curve = tuple[tuple[float, float], ...]  # (working-set bytes, read bytes/s), ascending


def read_bandwidth(curve: Curve, working_set: float) -> float:
    """Bytes/s of reading a working set of this size: the curve interpolated in log size, flat beyond its ends."""
    if working_set <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if working_set <= x1:
            t = math.log(working_set / x0) / math.log(x1 / x0)
            return y0 + t * (y1 - y0)
    return curve[-1][1]


@dataclass(frozen=True)
class DeviceSpeed:
    """One rank's device: peak FLOP/s per dtype, read bandwidth by working set, and the cost of one launched
    operation. On CPU, `machine_read` is the bandwidth every rank of the machine shares."""

    name: str
    flops: dict[str, float]
    read: Curve
    launch_s: float
    machine_read: Curve

    def bandwidth(self, working_set: float) -> float:
        return read_bandwidth(self.read, working_set)

    def machine_bandwidth(self, working_set: float) -> float:
        return read_bandwidth(self.machine_read, working_set)


class HardwareFile(BaseModel):
    """A user's hardware profile (or figures replacing a built-in profile's)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    peak_flops: dict[Literal["float32", "float16", "bfloat16"], PositiveFloat]
    memory_bandwidth: PositiveFloat
    launch_s: float = Field(8e-6, ge=0)
    node_link: Literal[tuple(LINKS)] = "pcie"  # type: ignore[valid-type]
    source: str = "user hardware file"


def load_hardware_file(path: Path) -> HardwareProfile:
    """A HardwareProfile from a hardware file; ValueError naming the file and field on bad input."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the hardware file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with name, peak_flops, memory_bandwidth (got "
                         f"{type(data).__name__})")
    try:
        spec = HardwareFile(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"] if str(p) not in ("", "[key]")) or "(top level)"
        raise ValueError(f"{path}: field '{field}': {first['msg']}") from None
    base = HARDWARE.get(spec.name)
    return HardwareProfile(
        spec.name, base.memory_bytes if base else 16 * 1024**3, tuple(spec.peak_flops), True,
        peak_flops=tuple(spec.peak_flops.items()), memory_bandwidth=spec.memory_bandwidth, launch_s=spec.launch_s,
        node_link=spec.node_link, source=spec.source)


def gpu_speed(profile: HardwareProfile) -> DeviceSpeed:
    if not profile.memory_bandwidth or not profile.peak_flops:
        raise ValueError(f"hardware profile {profile.name} has no peak FLOP/s or memory bandwidth; give them in a "
                         "hardware file (--hardware)")
    flat = ((1.0, profile.memory_bandwidth),)
    return DeviceSpeed(profile.name, dict(profile.peak_flops), flat, profile.launch_s, flat)


def cpu_speed(probe: dict, cores: int) -> DeviceSpeed:
    """A CPU rank with `cores` of the machine's cores: each figure interpolated between the probe's one-thread
    and all-core measurements."""
    total = int(probe["cores"])
    k = max(1, min(cores, total))
    share = 0.0 if total == 1 else (k - 1) / (total - 1)

    def at(one: float, every: float) -> float:
        return one + (every - one) * share

    flops = {d: at(probe["flops_1"][d], probe["flops_all"][d]) for d in probe["flops_1"]}
    read = tuple((size, at(one, every)) for (size, one), (_, every) in zip(probe["read_1"], probe["read_all"]))
    machine = tuple((size, every) for size, every in probe["read_all"])
    return DeviceSpeed(f"cpu ({k} of {total} cores)", flops, read, probe["launch_s"], machine)
