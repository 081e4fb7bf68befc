"""The GPU ledger: the cluster's devices by node and type, and what jobs hold or will hold.

The view comes from Ray (`ray.nodes()`: `GPU` counts devices, `accelerator_type:<T>` is only a
marker naming their type) or from a declared shape ("2x8xH100,1x4xA100"); it is refreshed by
the reconcile loop, never per offer. Holds are what running jobs occupy until their planned
end; accepted-but-not-started offers are reservations that expire after a bounded time.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

ACCELERATOR_PREFIX = "accelerator_type:"
RESERVATION_TTL_S = 3600.0   # an accepted offer whose training request never comes frees its slot
OVERRUN_GRACE_S = 120.0      # a job past its planned end is assumed to finish within this


@dataclass(frozen=True)
class Node:
    node_id: str
    gpu_type: str    # "H100", ...; "CPU" for a node without GPUs (CPU mode)
    gpus: int        # devices; in CPU mode, worker slots


@dataclass(frozen=True)
class ClusterView:
    nodes: tuple[Node, ...]
    source: str
    refreshed_at: float = 0.0

    @property
    def total(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def by_type(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            out.setdefault(n.gpu_type, []).append(n)
        return out

    def describe(self) -> str:
        counts: dict[tuple[str, int], int] = {}
        for n in self.nodes:
            counts[(n.gpu_type, n.gpus)] = counts.get((n.gpu_type, n.gpus), 0) + 1
        return ", ".join(f"{c}×{g}×{t}" for (t, g), c in sorted(counts.items())) or "no devices"


def parse_shape(spec: str) -> ClusterView:
    """"2x8xH100,1x4xA100" → 2 nodes of 8 H100 and 1 node of 4 A100. "1x2xCPU": 2 CPU slots."""
    nodes: list[Node] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)x([\w.\-]+)", part)
        if not m:
            raise ValueError(f"bad cluster shape {part!r}: expected NODESxGPUSxTYPE, e.g. 2x8xH100")
        count, gpus, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        nodes += [Node(f"{kind}-{len(nodes) + i}", kind, gpus) for i in range(count)]
    return ClusterView(tuple(nodes), f"declared {spec}", time.time())


def cpu_view(slots: int) -> ClusterView:
    return ClusterView((Node("cpu-0", "CPU", max(1, slots)),), "cpu", time.time())


def view_from_ray_nodes(nodes: list[dict], cpu_workers: int = 1) -> ClusterView:
    """From `ray.nodes()`: alive nodes with GPUs, typed by their accelerator marker. With no GPU
    anywhere, one CPU node whose slots are the cluster's CPUs per job (CPU mode)."""
    out, cpus = [], 0.0
    for n in nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {})
        cpus += res.get("CPU", 0.0)
        gpus = int(res.get("GPU", 0))
        if gpus <= 0:
            continue
        types = [k[len(ACCELERATOR_PREFIX):] for k in res if k.startswith(ACCELERATOR_PREFIX)]
        out.append(Node(n["NodeID"], types[0] if types else "GPU", gpus))
    if not out:
        # leave one CPU for the API and the job drivers
        return ClusterView((Node("cpu-0", "CPU", max(1, int((cpus - 1) // max(cpu_workers, 1)))),),
                           "ray-cpu", time.time())
    return ClusterView(tuple(sorted(out, key=lambda n: n.node_id)), "ray", time.time())


def view_from_ray(cpu_workers: int = 1) -> ClusterView:
    import ray

    return view_from_ray_nodes(ray.nodes(), cpu_workers)


def initial_view(use_gpu: bool, cpu_workers: int, spec: str | None = None) -> ClusterView:
    """Before Ray answers: the declared shape (settings.cluster_shape, MINER_CLUSTER) if any,
    else this machine."""
    if spec:
        return parse_shape(spec)
    if use_gpu:
        try:
            import torch

            n = torch.cuda.device_count()
            name = torch.cuda.get_device_name(0) if n else ""
            kind = next((k for k in ("H200", "H100", "A100", "L40S", "A10G") if k in name), "GPU")
            return ClusterView((Node("local", kind, n),), "local", time.time())
        except Exception:
            pass
    return cpu_view(max(1, (os.cpu_count() or 1) // max(cpu_workers, 1)))


@dataclass
class Hold:
    """Devices a job occupies on one node from `start` to `end` (planned)."""
    task_id: str
    node_id: str
    gpus: int
    start: float
    end: float


@dataclass
class Ledger:
    """The current view plus running holds; the timeline each node's devices free up on."""
    view: ClusterView
    holds: dict[str, Hold] = field(default_factory=dict)

    def hold(self, h: Hold) -> None:
        self.holds[h.task_id] = h

    def release(self, task_id: str) -> None:
        self.holds.pop(task_id, None)

    def free_times(self, now: float) -> dict[str, list[float]]:
        """Per node, the time each device becomes free (sorted). Holds on nodes that left the
        cluster are dropped; devices of holds past their end stay busy a short grace."""
        ends: dict[str, list[float]] = {n.node_id: [] for n in self.view.nodes}
        for h in self.holds.values():
            if h.node_id in ends:
                ends[h.node_id] += [max(h.end, now + OVERRUN_GRACE_S)] * h.gpus
        out = {}
        for n in self.view.nodes:
            busy = sorted(ends[n.node_id])[-n.gpus:] if n.gpus else []
            out[n.node_id] = [now] * (n.gpus - len(busy)) + busy
        return out

    def busy(self, now: float) -> int:
        return sum(h.gpus for h in self.holds.values() if h.start <= now)
