"""Task reward functions, run out of process: untrusted source is never exec'd here.

`RewardSandbox` keeps one long-lived worker process (reward_sandbox_worker.py) that confines
itself (empty network namespace, Landlock write confinement, seccomp: no sockets/fork/exec,
rlimits on memory/CPU/file size) and is fed batches over pipes. This side enforces a wall-clock
timeout per call and replaces a worker that hangs, crashes or is killed by a limit.

A reward function that fails never fails training: the affected samples score 0 and the failure
is counted with its reason (`failure_summary()`); a function that keeps hanging or crashing is
switched off after `max_consecutive_failures`. A function that fails to load (does not parse,
lacks `completions`, raises at import or in the validator's smoke test) is reported by `start()`.

Strength, honestly: with unprivileged user namespaces, Landlock (ABI >= 4 for TCP, >= 6 for
signals) and seccomp (x86_64/aarch64) - all present on this kernel - the function cannot reach the
network, write outside its temp dir, start processes or signal ours. Where a layer is missing the
hello message says so (`confinement`), and what remains is rlimits + the wall timeout. It can still
read any file the miner's user can read: keep secrets out of reach of that user or run the miner
in a container; there is no read confinement because reward functions import installed packages.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

WORKER = str(Path(__file__).with_name("reward_sandbox_worker.py"))
SIGNAL_REASONS = {signal.SIGXCPU: "CPU time limit", signal.SIGKILL: "killed", signal.SIGSEGV: "crashed (SIGSEGV)",
                  signal.SIGXFSZ: "file size limit", signal.SIGSYS: "forbidden system call"}


@dataclass(frozen=True)
class SandboxLimits:
    call_timeout_s: float = 60.0        # wall clock per batch call (slow reward packages exist)
    load_timeout_s: float = 20.0        # per function: module code + the validator's smoke test
    cpu_seconds: float = 60.0           # RLIMIT_CPU per call
    memory_bytes: int = 4 << 30         # RLIMIT_AS of the worker
    file_bytes: int = 16 << 20          # RLIMIT_FSIZE (writes are confined to a temp dir anyway)
    max_consecutive_failures: int = 3   # hangs/crashes in a row before a function is switched off


@dataclass
class LoadReport:
    index: int
    name: str
    ok: bool
    reason: str = ""
    supports_extra_data: bool = False


class WorkerDied(Exception):
    pass


class RewardSandbox:
    def __init__(self, sources: list[str], limits: SandboxLimits | None = None,
                 sample_rows: list[dict] | None = None, smoke: bool = True):
        self.sources = list(sources)
        self.smoke = smoke
        self.limits = limits or SandboxLimits()
        self.sample_rows = (sample_rows or [])[:10]
        self.reports: list[LoadReport] = []
        self.confinement: dict = {}
        self.failures: Counter = Counter()   # (function name, reason) -> failed samples
        self.calls = 0
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._slot: dict[int, int] = {}      # our function index -> index in the worker
        self._streak: Counter = Counter()
        self._disabled: set[int] = set()

    # lifecycle --------------------------------------------------------------
    def start(self) -> list[LoadReport]:
        """Loads every function (each in its own time budget); returns one report per function."""
        self._spawn()
        self.reports = []
        for i, src in enumerate(self.sources):
            name = _def_name(src) or f"reward_func_{i}"
            try:
                reply = self._request({"op": "load", "source": src, "sample": self.sample_rows, "smoke": self.smoke},
                                      self.limits.load_timeout_s)
            except WorkerDied as exc:
                self.reports.append(LoadReport(i, name, False, str(exc)))
                self._respawn()
                continue
            if reply.get("ok"):
                self._slot[i] = len(self._slot)
                self.reports.append(LoadReport(i, reply["name"], True, "", reply["extra_data"]))
            else:
                self.reports.append(LoadReport(i, name, False, reply["error"]))
        return self.reports

    def close(self) -> None:
        if self._proc is not None:
            _kill(self._proc)
            self._proc = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self):
        if not self.reports:
            self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # scoring ----------------------------------------------------------------
    def usable(self) -> list[int]:
        return [r.index for r in self.reports if r.ok and r.index not in self._disabled]

    def call(self, fn: int, completions: list, kwargs: dict | None = None) -> list[float]:
        """Rewards of function `fn` for a batch; never raises. Failed samples score 0."""
        n = len(completions)
        report = self.reports[fn]
        label = f"{report.name}#{fn}"
        if not report.ok or fn in self._disabled:
            return [0.0] * n
        self.calls += 1
        if (self._proc is None or self._proc.poll() is not None) and not self._try_respawn(label, n):
            return [0.0] * n
        try:
            reply = self._request({"op": "call", "fn": self._slot[fn], "completions": completions,
                                   "kwargs": kwargs or {}}, self.limits.call_timeout_s)
        except WorkerDied as exc:  # hang, OOM kill, CPU limit, crash: the whole batch scores 0
            self._count(label, str(exc), n)
            self._streak[fn] += 1
            if self._streak[fn] >= self.limits.max_consecutive_failures:
                self._disabled.add(fn)
                self._count(label, f"switched off after {self._streak[fn]} failures in a row", 0)
            self._try_respawn(label, 0)
            return [0.0] * n
        self._streak[fn] = 0
        if reply.get("ok"):
            return reply["rewards"]
        if n == 1:
            self._count(label, reply["error"], 1)
            return [0.0]
        return [self.call(fn, [c], _row(kwargs or {}, j, n))[0] for j, c in enumerate(completions)]

    def failure_summary(self) -> dict:
        out: dict = {}
        for (name, reason), count in self.failures.items():
            out.setdefault(name, {})[reason] = count
        return {"calls": self.calls, "failed_samples": out,
                "switched_off": [f"{self.reports[i].name}#{i}" for i in sorted(self._disabled)],
                "load_failures": {f"{r.name}#{r.index}": r.reason for r in self.reports if not r.ok},
                "confinement": self.confinement}

    def _count(self, name: str, reason: str, samples: int) -> None:
        self.failures[(name, reason)] += samples

    # process plumbing -------------------------------------------------------
    def _spawn(self) -> None:
        self._dir = self._dir or tempfile.mkdtemp(prefix="reward-sandbox-")
        work = tempfile.mkdtemp(dir=self._dir)
        limits = {"work_dir": work, "memory_bytes": self.limits.memory_bytes,
                  "file_bytes": self.limits.file_bytes, "cpu_seconds": self.limits.cpu_seconds}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self._proc = subprocess.Popen([sys.executable, "-I", WORKER, json.dumps(limits)], cwd=work, env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      close_fds=True, start_new_session=True)
        self.confinement = self._read(self.limits.load_timeout_s)["hello"]

    def _respawn(self) -> None:
        """A fresh worker with the functions that loaded, in the same order (no smoke test)."""
        _kill(self._proc)
        self._spawn()
        for i in sorted(self._slot, key=self._slot.get):
            self._request({"op": "load", "source": self.sources[i], "smoke": False}, self.limits.load_timeout_s)

    def _try_respawn(self, label: str, samples: int) -> bool:
        """Never raises: a worker that cannot be restarted costs these samples, and the next call
        tries again."""
        try:
            self._respawn()
            return True
        except (WorkerDied, OSError) as exc:
            self._count(label, f"sandbox restart failed: {exc}", samples)
            _kill(self._proc)
            self._proc = None
            return False

    def _request(self, obj: dict, timeout: float) -> dict:
        data = json.dumps(obj).encode()
        try:
            self._proc.stdin.write(struct.pack(">I", len(data)) + data)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerDied(self._death_reason(timeout))
        return self._read(timeout)

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        head = self._read_exact(4, deadline, timeout)
        return json.loads(self._read_exact(struct.unpack(">I", head)[0], deadline, timeout))

    def _read_exact(self, n: int, deadline: float, timeout: float) -> bytes:
        fd, buf = self._proc.stdout.fileno(), b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                _kill(self._proc)
                raise WorkerDied(f"timed out after {timeout:g} s")
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise WorkerDied(self._death_reason(timeout))
            buf += chunk
        return buf

    def _death_reason(self, timeout: float) -> str:
        try:
            code = self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            _kill(self._proc)
            return f"timed out after {timeout:g} s"
        if code < 0:
            return f"worker {SIGNAL_REASONS.get(-code, f'killed by signal {-code}')}"
        return f"worker exited with status {code}"


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _def_name(source: str) -> str | None:
    import re

    m = re.search(r"def\s+(\w+)\s*\(", source)
    return m.group(1) if m else None


def _row(kwargs: dict, j: int, n: int) -> dict:
    """Per-sample slice of batch kwargs (lists of length n are per-sample columns)."""
    return {k: ([v[j]] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}


def check_reward_functions(dataset_type: dict, sample_rows: list[dict] | None = None,
                           limits: SandboxLimits | None = None, smoke: bool = True) -> list[LoadReport]:
    """Loads a GRPO task's reward functions in the sandbox and reports on each. With `smoke`, also
    the validator's test call (on up to 10 sample rows, else its two fixed strings)."""
    sources = [rf.get("reward_func", "") for rf in (dataset_type.get("reward_functions") or [])]
    if not sources:
        return []
    with RewardSandbox(sources, limits, sample_rows, smoke=smoke) as box:
        return box.reports


def usable_reward_problem(reports: list[LoadReport], weights: list[float], undecided_ok: bool = False) -> str | None:
    """None when at least one function loads and carries weight, else the readable reason.
    `undecided_ok`: a load that timed out (a slow import under a short budget) counts as usable."""
    if not reports:
        return "the task has no reward functions"
    if any((r.ok or undecided_ok and r.reason.startswith("timed out")) and weights[r.index] > 0 for r in reports):
        return None
    reasons = "; ".join(f"{r.name}: {r.reason or 'weight 0'}" for r in reports)
    return f"no usable reward function ({reasons})"


def reward_functions_problem(dataset_type: dict) -> str | None:
    """The start_training check (answers within the validator's 10 s): every function parses,
    loads and takes `completions`, in the sandbox with a short budget; no data yet, so no smoke
    test (plan time does that on the downloaded rows)."""
    funcs = dataset_type.get("reward_functions") or []
    weights = [float(f.get("reward_weight", 0) or 0) for f in funcs]
    limits = SandboxLimits(load_timeout_s=1.5, cpu_seconds=2, memory_bytes=1 << 30)
    return usable_reward_problem(check_reward_functions(dataset_type, limits=limits, smoke=False), weights,
                                 undecided_ok=True)
