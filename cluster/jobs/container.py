"""The validator's trainer container, reproduced on one machine without Docker.

What G.O.D's trainer does around our entrypoint (gradients-protocol.md §10.2, §13): a
downloader fills a read-only `/cache` (the model under `/cache/models/<name>`, the data at
`/cache/datasets/<task_id>_train_data.json`), the container runs with no network, every
capability dropped and a small /dev/shm, it is killed at hours × 3600 s (a kill counts as
success), and the uploader takes `/app/checkpoints/<task_id>/<expected_repo_name>`. This module
lays out such a cache, runs a command under the same restrictions (Linux namespaces: `unshare`
and `setpriv`, as root), kills it at the limit, and picks the folder the uploader would upload.
`miner simulate --tournament` and the tournament tests use it.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

APP_CHECKPOINTS = Path("/app/checkpoints")
# `ip link set lo up` without iproute2 (SIOCSIFFLAGS: IFF_UP | IFF_LOOPBACK | IFF_RUNNING): Ray talks to itself
LOOPBACK_UP = ("import fcntl, socket, struct; fcntl.ioctl(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), 0x8914, "
               "struct.pack('16sh22x', b'lo', 0x1 | 0x8 | 0x40))")
CACHE = Path("/cache")
METADATA_FILES = {".git", ".gitattributes", ".gitignore", ".gitkeep"}  # what the uploader calls empty


def cache_model_name(model_id: str, salt: str = "") -> str:
    """The folder the downloader puts a model in: `org--name`, or a salted hash of the id when the
    validator hides which model it is (the trainer must not care which)."""
    if not salt:
        return model_id.replace("/", "--")
    return hashlib.sha256(f"{salt}{model_id}".encode()).hexdigest()[:16]


def lay_out_cache(cache: Path, task_id: str, model_dir: Path, train_file: Path, model_name: str) -> None:
    """A /cache like the downloader's; the model is copied (not linked: links out of a mounted
    volume do not resolve in the container either)."""
    (cache / "models").mkdir(parents=True, exist_ok=True)
    (cache / "datasets").mkdir(parents=True, exist_ok=True)
    (cache / "hf_cache").mkdir(parents=True, exist_ok=True)
    dest = cache / "models" / model_name
    if not dest.exists():
        shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("training_summary.json"))
    shutil.copyfile(train_file, cache / "datasets" / f"{task_id}_train_data.json")


@dataclass(frozen=True)
class Sandbox:
    """The container's restrictions around one command. `mounts`: container path -> host folder
    (bind-mounted there, e.g. /app/checkpoints and /cache); every other path is read-only except
    the listed `writable` host folders; `shm_bytes` sizes a private /dev/shm."""
    mounts: dict[str, str]
    writable: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()   # container paths mounted read-only (the validator's /cache)
    shm_bytes: int = 8 * 1024**3

    def wrap(self, cmd: list[str]) -> list[str]:
        steps = ["mount --make-rprivate /", "mount --bind / /", "mount -o remount,bind,ro /"]
        for inside, host in self.mounts.items():
            ro = inside in self.read_only
            steps += [f"mount --bind {shlex.quote(host)} {shlex.quote(inside)}",
                      f"mount -o remount,bind,{'ro' if ro else 'rw'} {shlex.quote(inside)}"]
        for path in self.writable:
            steps += [f"mount --bind {shlex.quote(path)} {shlex.quote(path)}",
                      f"mount -o remount,bind,rw {shlex.quote(path)}"]
        steps += [f"mount -t tmpfs -o size={self.shm_bytes} tmpfs /dev/shm",
                  f"{shlex.quote(sys.executable)} -c {shlex.quote(LOOPBACK_UP)}",  # the internal network: loopback only
                  "exec setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all --no-new-privs "
                  + shlex.join(cmd)]
        return ["unshare", "--net", "--mount", "sh", "-ec", " && ".join(steps)]


def sandbox_problem() -> str | None:
    """Why this machine cannot run the sandbox (None: it can)."""
    if os.geteuid() != 0:
        return "the container sandbox needs root (Linux namespaces and bind mounts)"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"the container sandbox needs `{tool}`"
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --net --mount fails here: {probe.stderr.strip()}"
    return None


def ensure_mountpoints(*paths: Path) -> None:
    """The container's fixed paths (/app/checkpoints, /cache) as empty folders to mount over."""
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)


@dataclass
class RunResult:
    returncode: int | None     # None: killed at the limit
    seconds: float
    killed: bool
    log: str

    @property
    def succeeded(self) -> bool:
        """The validator's rule: a clean exit, or a kill at the time limit."""
        return self.killed or self.returncode == 0


def run_with_limit(cmd: list[str], env: dict, limit_s: float, log_path: Path, on_tick=None) -> RunResult:
    """Runs `cmd` in its own process group, SIGKILLs the group at `limit_s` (docker kill), and
    calls `on_tick()` about 5 times a second meanwhile (tests watch the output folder with it; a
    true answer kills the run at once, as a limit that came early would)."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        while proc.poll() is None:
            if time.time() - start >= limit_s or (on_tick is not None and on_tick()):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(0.2)
    return RunResult(None if killed else proc.returncode, time.time() - start, killed, log_path.read_text())


def upload_candidate(out_dir: Path) -> Path | None:
    """The folder G.O.D's uploader pushes (trainer/containers/uploader.py): the first immediate
    sub-folder, in directory order, that directly holds a `.safetensors` file, else the folder
    itself; None when that is empty or metadata only (the upload fails, the task fails)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    for name in os.listdir(out_dir):
        sub = out_dir / name
        if sub.is_dir() and any(f.endswith(".safetensors") for f in os.listdir(sub)):
            return sub
    for item in out_dir.iterdir():
        if (item.is_dir() and item.name != ".git") or (item.is_file() and item.name not in METADATA_FILES
                                                         and item.stat().st_size > 1024):
            return out_dir
    return None


def model_folders(out_dir: Path) -> list[Path]:
    """Every folder inside `out_dir` (itself included) that holds weights: exactly one, the top
    level, is what a tournament output must show at every moment after the first export."""
    out_dir = Path(out_dir)
    return [p for p in [out_dir, *sorted(q for q in out_dir.rglob("*") if q.is_dir())] if any(p.glob("*.safetensors"))]
