"""`miner simulate`: plays a G.O.D validator against a miner, end to end.

It makes its own sr25519 validator key and registers it in the metagraph file, serves each
task's train.json from a local HTTP server as the "presigned URL", sends offers and training
requests exactly as G.O.D does (json.dumps body, fiber headers), waits for the submission,
checks the repo name and the model hash against the published snapshot, and scores base and
submission with the project's validator-metric evaluator on the task's test.json.
"""
from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from cluster.jobs.hub import hub_from_settings
from cluster.jobs.model_hash import calculate_model_hash
from cluster.protocol.signing import signed_headers
from cluster.protocol.wire import TaskType
from cluster.settings import Settings

if TYPE_CHECKING:  # the chain SDK is imported where a key is made (validator_keypair)
    from substrateinterface import Keypair

GRACE_S = 120  # how long past the deadline we keep asking for the submission


@dataclass
class TaskSpec:
    name: str
    path: Path
    task_type: TaskType
    dataset_type: dict
    hours: float
    kl_coef: float | None = None   # task.json's kl_coef: a KL-weighted Instruct task (USE_KL=1, KL_COEF)


@dataclass
class Outcome:
    task: str
    task_type: str
    accepted: bool
    status: str
    base_loss: float | None = None
    submission_loss: float | None = None
    hash_ok: bool | None = None
    detail: str = ""
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    expected_repo_name: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def verified(self) -> bool:
        return self.status == "published" and bool(self.hash_ok)


def load_task(path: Path, minutes: float | None) -> TaskSpec:
    meta = json.loads((path / "task.json").read_text())
    for needed in ("train.json", "test.json"):
        if not (path / needed).exists():
            raise FileNotFoundError(f"task folder {path} lacks {needed}")
    hours = minutes / 60 if minutes else float(meta["hours_to_complete"])
    return TaskSpec(path.name, path, TaskType(meta["task_type"]), meta["dataset_type"], hours, meta.get("kl_coef"))


class DatasetServer:
    """Serves the named files over HTTP on loopback, like the validator's presigned S3 URLs."""

    def __init__(self):
        self.files: dict[str, Path] = {}
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = files.get(self.path.split("?", 1)[0].lstrip("/"))
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()

    def publish(self, path: Path) -> str:
        name = f"{uuid.uuid4().hex}_train_data.json"
        self.files[name] = path
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}?X-Amz-Expires=604800&X-Amz-Signature=simulated"


class ValidatorClient:
    """Sends requests the way fiber's validator client does."""

    def __init__(self, base_url: str, keypair: Keypair, miner_ss58: str):
        self.base_url = base_url.rstrip("/")
        self.keypair = keypair
        self.miner_ss58 = miner_ss58

    def post(self, path: str, payload: dict, timeout: float) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **signed_headers(self.keypair, self.miner_ss58, body)}
        return httpx.post(self.base_url + path, content=body, headers=headers, timeout=timeout)

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=signed_headers(self.keypair, self.miner_ss58, b""),
                         timeout=timeout)


def validator_keypair(settings: Settings) -> Keypair:
    """The simulator's own validator key, kept in the state dir and registered in the metagraph."""
    from substrateinterface import Keypair

    path = settings.state_dir / "simulator_validator.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"mnemonic": Keypair.generate_mnemonic()}))
    kp = Keypair.create_from_mnemonic(json.loads(path.read_text())["mnemonic"])
    register_validator(settings.metagraph_file, kp.ss58_address, max(settings.min_stake_threshold, 1.0) * 10)
    return kp


def register_validator(metagraph_file: Path, hotkey: str, stake: float) -> None:
    from cluster.protocol.metagraph import read_nodes_file, write_nodes_file

    write_nodes_file(metagraph_file, {**read_nodes_file(metagraph_file), hotkey: stake})


def run_simulation(tasks: list[TaskSpec], model: str | None, client: ValidatorClient, settings: Settings,
                   log=print) -> list[Outcome]:
    outcomes: list[tuple[TaskSpec, Outcome, str, float]] = []
    with DatasetServer() as server:
        for spec in tasks:
            base_model = model or json.loads((spec.path / "task.json").read_text()).get("model", "")
            out = Outcome(spec.name, spec.task_type.value, accepted=False, status="declined")
            offer = {"ds_size": 100_000, "model": base_model, "hours_to_complete": spec.hours,
                     "task_id": out.task_id, "task_type": spec.task_type.value, "model_params_count": None}
            resp = client.post("/task_offer/", offer, timeout=3)
            answer = resp.json() if resp.status_code == 200 else {}
            out.accepted = answer.get("accepted") is True
            out.detail = answer.get("message") or f"HTTP {resp.status_code}: {resp.text[:200]}"
            log(f"offer {spec.name}: accepted={out.accepted} ({out.detail})")
            if not out.accepted:
                outcomes.append((spec, out, base_model, 0.0))
                continue
            request = {"model": base_model, "task_id": out.task_id, "hours_to_complete": spec.hours,
                       "expected_repo_name": out.expected_repo_name,
                       "dataset": server.publish(spec.path / "train.json"),
                       "dataset_type": spec.dataset_type, "file_format": "s3"}
            endpoint = "/start_training_grpo/" if spec.task_type == TaskType.GRPOTASK else "/start_training/"
            resp = client.post(endpoint, request, timeout=10)
            out.status = "training" if resp.status_code == 200 else "refused"
            if resp.status_code != 200:
                out.detail = f"start_training HTTP {resp.status_code}: {resp.text[:300]}"
            log(f"start_training {spec.name}: HTTP {resp.status_code} {resp.text[:200]}")
            outcomes.append((spec, out, base_model, time.time() + spec.hours * 3600))
        for spec, out, base_model, deadline in outcomes:
            if out.status == "training":
                _await_and_verify(spec, out, base_model, deadline, client, settings, log)
    return [out for _, out, _, _ in outcomes]


def _await_and_verify(spec: TaskSpec, out: Outcome, base_model: str, deadline: float,
                      client: ValidatorClient, settings: Settings, log) -> None:
    log(f"waiting for {spec.name} (deadline in {deadline - time.time():.0f} s) ...")
    submission = None
    while time.time() < deadline + GRACE_S:
        resp = client.get(f"/get_latest_model_submission/{out.task_id}")
        if resp.status_code == 200:
            submission = resp.json()
            break
        time.sleep(3)
    if submission is None:
        out.status, out.detail = "no submission", "nothing published before the deadline"
        return
    out.status = "published"
    if submission["repo"].split("/")[-1] != out.expected_repo_name:
        out.hash_ok, out.detail = False, f"repository name mismatch: {submission['repo']}"
        return
    snapshot = hub_from_settings(settings).snapshot(submission["repo"])
    out.hash_ok = calculate_model_hash(snapshot) == submission.get("model_hash")
    from transformers.utils import logging as hf_logging

    from trainers.evaluate import METRICS, evaluate_path

    hf_logging.disable_progress_bar()  # the scoring's weight-loading bars and warnings would land on the table
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, not ours to act on
    if spec.task_type.value in METRICS:
        test = spec.path / "test.json"
        kind = spec.task_type.value
        kl = spec.kl_coef or 0.0  # the validator's weighted score on a KL-weighted task
        out.base_loss = evaluate_path(base_model, base_model, test, spec.dataset_type, kind, kl)
        out.submission_loss = evaluate_path(snapshot, base_model, test, spec.dataset_type, kind, kl)
    out.detail = submission["repo"]

