"""The cluster brain without Ray: planner and admission on tables of (model size, task type,
hours, cluster shape, queue) with the expected decision and reason."""
import math
import uuid

import pytest

from cluster.planning import capacity
from cluster.planning.admission import PLANNABLE, Admission, Request
from cluster.planning.knowledge import Knowledge, Run
from cluster.planning.ledger import Hold, parse_shape, view_from_ray_nodes
from cluster.planning.scheduling import JOB, Item, Scheduler
from cluster.protocol.wire import TaskType

NOW = 1_800_000_000.0
B = 1_000_000_000
I, D, G, C = TaskType.INSTRUCTTEXTTASK, TaskType.DPOTASK, TaskType.GRPOTASK, TaskType.CHATTASK


def brain(shape: str, knowledge: Knowledge | None = None) -> Admission:
    return Admission(Scheduler(parse_shape(shape)), knowledge, supported=set(PLANNABLE))


def ask(adm: Admission, params: float, task=I, hours=2.0, now=NOW, model="org/some-model", config=None):
    return adm.decide(Request(str(uuid.uuid4()), task, model, hours, int(params), config), now)


def accept(adm: Admission, params: float, task=I, hours=2.0, now=NOW):
    """Accepts and keeps the promise in the queue, as the control plane does."""
    req = Request(str(uuid.uuid4()), task, "org/m", hours, int(params))
    d = adm.decide(req, now, kind=JOB)
    if d.accepted:
        adm.scheduler.add(Item(req.task_id, d.plan, now + hours * 3600, JOB))
    return d


def fill(adm: Admission, until: float) -> None:
    """Every device busy with running jobs until `until`."""
    for node in adm.scheduler.view.nodes:
        adm.scheduler.ledger.hold(Hold(f"run-{node.node_id}", node.node_id, node.gpus, NOW - 600, until))


# (case, cluster, queue filled for h, params, task, hours, accepted, reason fragment)
TABLE = [
    ("70B DPO on one H100", "1x1xH100", 0, 70 * B, D, 10, False, "too big for the cluster"),
    ("70B DPO on 8xH100", "1x8xH100", 0, 70 * B, D, 10, True, "lora_zero3 on 8×H100"),
    ("8B instruct 1 h, queue full until then", "1x8xH100", 1.0, 8 * B, I, 1, False, "busy until"),
    ("8B instruct 1 h, queue full 15 min", "1x8xH100", 0.25, 8 * B, I, 1, True, "starting at"),
    ("8B instruct 1 h, idle", "1x8xH100", 0, 8 * B, I, 1, True, "lora on 2×H100, starting now"),
    ("8B GRPO in 0.3 h", "1x8xH100", 0, 8 * B, G, 0.3, False, "not enough time"),
    ("70B GRPO in 10 h: needs ZeRO-3, which GRPO lacks", "1x8xH100", 0, 70 * B, G, 10, False, "too big"),
    ("0.5B chat 2 h on one H100", "1x1xH100", 0, 0.5 * B, C, 2, True, "full on 1×H100"),
    ("32B DPO on 4xA100", "1x4xA100", 0, 32 * B, D, 10, True, "lora_zero3 on 4×A100"),
    ("70B instruct prefers H100 over A100", "1x8xA100,1x8xH100", 0, 70 * B, I, 6, True, "8×H100"),
    ("1B on a CPU-only cluster", "1x2xCPU", 0, 1 * B, I, 2, False, "too big for the cluster"),
    ("tiny on a CPU-only cluster", "1x2xCPU", 0, 5_000_000, I, 0.05, True, "CPU worker"),
]


@pytest.mark.parametrize("case,shape,busy_h,params,task,hours,accepted,reason", TABLE, ids=[t[0] for t in TABLE])
def test_decision_table(case, shape, busy_h, params, task, hours, accepted, reason):
    adm = brain(shape)
    if busy_h:
        fill(adm, NOW + busy_h * 3600)
    d = ask(adm, params, task, hours)
    assert d.accepted is accepted, d.message
    assert reason in d.message
    assert d.message.startswith("accepted" if accepted else "declined")


def test_two_1b_jobs_run_side_by_side_on_one_8_gpu_node():
    adm = brain("1x8xH100")
    a, b = accept(adm, 1 * B), accept(adm, 1.2 * B)
    assert a.accepted and b.accepted
    assert a.placement.node_id == b.placement.node_id
    assert a.placement.start == b.placement.start == NOW
    assert a.plan.gpus == b.plan.gpus == 1


def test_new_job_never_makes_an_accepted_job_late():
    adm = brain("1x1xH100")
    first = accept(adm, 1 * B, hours=3)          # one GPU: this one has slack
    urgent = accept(adm, 1 * B, hours=1.0)       # earlier deadline: goes first, first still fits
    assert first.accepted and urgent.accepted
    third = ask(adm, 1 * B, hours=1.0)
    assert not third.accepted and "busy until" in third.message
    order = sorted(adm.scheduler.place_all(list(adm.scheduler.queue.values()), NOW), key=lambda p: p.start)
    assert all(p.on_time for p in order) and order[0].end <= order[1].start


def test_unsupported_type_and_remote_code_families_are_declined():
    adm = Admission(Scheduler(parse_shape("1x8xH100")))   # default set: trainers that exist
    d = ask(adm, 1 * B, TaskType.IMAGETASK)   # text-only miner: no image trainer, not plannable
    assert not d.accepted and "not supported" in d.message and "InstructTextTask" in d.message
    d = ask(adm, 1 * B, config={"model_type": "quasar", "auto_map": {"AutoModel": "x.Y"}})
    assert not d.accepted and "trust_remote_code" in d.message


def test_family_that_failed_twice_is_declined_until_it_succeeds():
    know = Knowledge()
    adm = brain("1x8xH100", know)
    cfg = {"model_type": "falcon", "hidden_size": 2048, "num_hidden_layers": 24, "vocab_size": 65024}
    for _ in range(2):
        assert ask(adm, 1 * B, config=cfg).accepted
        know.record(Run("falcon", "failed", reason="CUDA error in rotary"))
    d = ask(adm, 1 * B, config=cfg)
    assert not d.accepted and "'falcon' failed 2 times" in d.message
    assert ask(adm, 1 * B, config={**cfg, "model_type": "llama"}).accepted   # other families unaffected
    know.record(Run("falcon", "published"))
    assert ask(adm, 1 * B, config=cfg).accepted


def test_measured_throughput_scales_time_estimates():
    know = Knowledge()
    adm = brain("1x8xH100", know)
    cfg = {"model_type": "gemma2"}
    fast = ask(adm, 70 * B, D, hours=1.5, config=cfg)
    assert fast.accepted, fast.message
    know.record(Run("gemma2", "published", tokens_per_s=1000.0, predicted_tokens_per_s=4000.0))  # 4× slower
    assert know.speedup("gemma2") == 0.25
    slow = ask(adm, 70 * B, D, hours=1.5, config=cfg)
    assert not slow.accepted and "not enough time" in slow.message


def test_reservations_expire_and_free_their_devices():
    adm = brain("1x1xH100")
    adm.scheduler.reservation_ttl_s = 600
    d = adm.decide(Request("offer-1", I, "org/m", 2.0, int(3 * B)), NOW)
    adm.scheduler.add(Item("offer-1", d.plan, NOW + 2 * 3600, "offer", NOW + 600))
    assert not ask(adm, 3 * B, hours=2.0).accepted       # the reservation holds the only GPU
    assert adm.scheduler.expire(NOW + 601) == ["offer-1"]
    assert ask(adm, 3 * B, hours=2.0, now=NOW + 601).accepted


def test_planner_memory_and_shapes():
    full = capacity.plan_options(1 * B, "InstructTextTask", "H100", 8)[0]
    assert (full.method, full.gpus, full.workers, full.cpus_per_worker) == ("full", 1, 1, 1.0)
    dpo_full = capacity.memory_per_gpu_gib(3 * B, "DpoTask", "full", 1, capacity.device("H100"))
    sft_full = capacity.memory_per_gpu_gib(3 * B, "InstructTextTask", "full", 1, capacity.device("H100"))
    assert dpo_full > sft_full + 5   # the reference model and chosen+rejected activations
    grpo = capacity.memory_per_gpu_gib(8 * B, "GrpoTask", "lora", 1, capacity.device("H100"))
    assert grpo > capacity.memory_per_gpu_gib(8 * B, "InstructTextTask", "lora", 1, capacity.device("H100")) + 20
    big = capacity.plan_options(70 * B, "InstructTextTask", "H100", 8)
    assert [p.gpus for p in big] == [8, 4] and all(p.method == "lora_zero3" for p in big)
    assert all(p.mem_per_gpu_gib <= 80 for p in big) and big[0].min_s < big[1].min_s
    assert (big[0].workers, big[0].cpus_per_worker) == (8, 1.0)   # Ray Train: 8 × {GPU: 1, CPU: 1}, one node


def test_ray_view_counts_gpus_not_accelerator_markers():
    nodes = [{"NodeID": "b", "Alive": True, "Resources": {"CPU": 64, "GPU": 8, "accelerator_type:H100": 1}},
             {"NodeID": "a", "Alive": True, "Resources": {"CPU": 32, "GPU": 4, "accelerator_type:A100": 1}},
             {"NodeID": "c", "Alive": False, "Resources": {"GPU": 8, "accelerator_type:H100": 1}},
             {"NodeID": "head", "Alive": True, "Resources": {"CPU": 8}}]
    view = view_from_ray_nodes(nodes)
    assert view.total == 12 and view.describe() == "1×4×A100, 1×8×H100"
    cpu = view_from_ray_nodes([{"NodeID": "h", "Alive": True, "Resources": {"CPU": 4}}])
    assert cpu.nodes[0].gpu_type == "CPU" and cpu.nodes[0].gpus == 3
    with pytest.raises(ValueError, match="bad cluster shape"):
        parse_shape("8 H100")


def test_idle_cluster_of_the_configured_shape_decides_by_capability(tmp_path, monkeypatch, idle_decide):
    from cluster.settings import load_settings

    monkeypatch.setenv("MINER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MINER_CLUSTER", "1x1xH100")
    settings = load_settings()
    assert idle_decide(I, "org/model-1B", 2.0, settings).accepted
    big = idle_decide(I, "org/model-70B", 2.0, settings)
    assert not big.accepted and "parameters is over" in big.message and "1×1×H100" in big.message


def test_full_fine_tunes_are_planned_only_where_master_weights_fit():
    """bf16 AdamW loses most full-FT updates, so the planner plans a full fine-tune only where the
    trainer's fp32 master state fits its share of one device; above that, LoRA."""
    from trainers.grpo import GRPO_MASTER_SHARE
    from trainers.master_weights import MASTER_BYTES, STATE_SHARE

    assert capacity.FULL_BYTES == MASTER_BYTES and capacity.MASTER_SHARE_DEFAULT == STATE_SHARE
    assert capacity.MASTER_SHARE["GrpoTask"] == GRPO_MASTER_SHARE
    h100, h200 = capacity.device("H100"), capacity.device("H200")
    method = lambda b, task="InstructTextTask", dev=h100: capacity.method_and_min_gpus(b * B, task, dev, 8)[0]  # noqa: E731
    assert [method(b) for b in (1.2, 3.2, 4.0, 8.0)] == ["full", "full", "lora", "lora"]
    assert [method(b, dev=h200) for b in (4.0, 6.0, 8.0)] == ["full", "full", "lora"]   # 141 GB holds more
    assert [method(b, "GrpoTask") for b in (0.5, 1.2, 1.7, 3.2)] == ["full", "full", "lora", "lora"]
    # the limit is the master state's bytes against the share, as the trainer's fits() computes it
    limit = capacity.MASTER_SHARE_DEFAULT * 80 * capacity.GIB / MASTER_BYTES
    assert method(limit * 0.99 / B) == "full" and method(limit * 1.01 / B) == "lora"


def test_publish_reserve_is_a_high_quantile_that_grows_with_what_is_published():
    full3 = capacity.plan_options(3 * B, "InstructTextTask", "H100", 8)[0]
    lora70 = capacity.plan_options(70 * B, "InstructTextTask", "H100", 8)[0]
    t = capacity.GPU_TIMING
    # a full 3 B publishes 6 GB, a 70 B LoRA only its adapters: the reserve follows the bytes
    assert full3.method == "full" and full3.publish_s == pytest.approx(6e9 / t.save_bps + 6e9 / t.upload_bps)
    assert lora70.publish_s < full3.publish_s
    # the reserve is the 1-in-100,000 quantile of a lognormal publish time (σ 0.5), plus the margin
    tail = math.exp(4.26 * 0.5)
    assert full3.post_s == pytest.approx(full3.publish_s * tail + t.margin_s)
    assert math.exp(4.26 * 0.5) > 8       # ~8.4× the nominal
    # the minimum window holds the whole reserve: admission never plans a job into it
    assert full3.min_s > full3.post_s + t.min_train_s
    assert full3.overhead_s > full3.post_s
    # job_main stops training at the larger of the plan's reserve and a share of the window
    assert capacity.training_stop_s(full3.post_s, 3600) == full3.post_s
    assert capacity.training_stop_s(10.0, 3600) == 20 + 0.05 * 3600


def test_measured_publish_speed_sizes_the_reserve():
    know = Knowledge()
    adm = brain("1x8xH100", know)
    before = ask(adm, 3 * B, hours=4).plan
    assert ask(adm, 3 * B, hours=0.5).accepted
    for i in range(5):   # tiny adapters measure the hub's latency, not its bandwidth: ignored
        know.record(Run("llama", "published", upload_bytes=int(20e6), upload_s=5.0))
    for i in range(4):   # too few measurements: the planner's defaults still hold
        know.record(Run("llama", "published", upload_bytes=int(16e9), upload_s=16e9 / 25e6))
    assert ask(adm, 3 * B, hours=4).plan.post_s == before.post_s
    know.record(Run("llama", "published", upload_bytes=int(16e9), upload_s=16e9 / 20e6))
    slow = ask(adm, 3 * B, hours=4).plan     # a 4× slower link than planned: a bigger reserve
    assert slow.publish_s > 3 * before.publish_s and slow.post_s > before.post_s and slow.min_s > before.min_s
    timing = know.publish_timing(capacity.GPU_TIMING)
    assert timing.upload_bps == 25e6 and timing.publish_sigma == 0.3   # steady uploads: the σ floor
    # a 0.5 h job whose reserve no longer fits is declined with the reason, not accepted to be missed
    d = ask(adm, 3 * B, hours=0.5)
    assert not d.accepted and "not enough time" in d.message
