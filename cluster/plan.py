"""The one plan record: from the capacity planner through the queue, the store (as JSON), the
Ray Job runner and job_main to the knowledge base. A leaf: it imports nothing of the cluster."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Plan:
    """A job's shape and time: `gpus` devices of `gpu_type` on one node, `workers` Train workers;
    once dispatched, also where and when (`node_id`, `planned_*`). The one plan type from the
    planner through the queue, the store (as JSON), the Ray Job runner and job_main to the
    knowledge base. Defaults are what a missing field meant in the old dict rows."""
    task_type: str = ""
    params: int = 0
    method: str = ""            # full | lora | lora_zero3 ("": a row stored before plans were)
    gpu_type: str = "CPU"
    gpus: int = 0               # devices held (0 in CPU mode)
    workers: int = 0            # Ray Train workers (one per GPU; 0: settings.num_workers)
    cpus_per_worker: float = 1.0
    mem_per_gpu_gib: float = 0.0
    tokens_per_s: float = 0.0   # whole job
    min_s: float = 0.0          # shortest useful run, overheads and margin included
    target_s: float = 0.0       # what the job uses when time allows (capped later by the deadline)
    overhead_s: float = 0.0     # download + load + save + upload + fixed margin
    post_s: float = 0.0         # save + upload + fixed margin: kept back from the end of the window
    publish_s: float = 0.0      # nominal save + upload (post_s is its high quantile + margin)
    # Set by dispatch: the node the ledger placed the job on and its window there.
    node_id: str | None = None
    planned_start: float | None = None
    planned_end: float | None = None
    pinned: bool = False        # node_id is a Ray node id (a live view): the driver asks for it

    def placed(self, node_id: str | None, start: float, end: float, pinned: bool) -> "Plan":
        return replace(self, node_id=node_id, planned_start=start, planned_end=end, pinned=pinned)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: "dict | Plan | None") -> "Plan | None":
        """A stored plan (JSON dict, old rows included: unknown keys are ignored, missing ones
        take the defaults); None stays None."""
        if d is None or isinstance(d, Plan):
            return d
        return Plan(**{k: d[k] for k in Plan.__dataclass_fields__ if d.get(k) is not None})
