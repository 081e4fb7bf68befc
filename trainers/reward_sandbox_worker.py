"""The child side of the reward sandbox: confines itself, then runs reward functions on request.

Started by reward_sandbox.py as `python -I <this file> <limits json>`; stdlib only (it runs in
isolated mode, without the project on sys.path). Confinement, strongest first, each applied when
the kernel offers it and recorded in the hello message:
  1. unshare(CLONE_NEWUSER|CLONE_NEWNET): an empty network namespace (no interface but a down lo).
  2. rlimits: RLIMIT_AS (memory), RLIMIT_CPU (per call, re-armed before each), RLIMIT_FSIZE,
     RLIMIT_NOFILE, RLIMIT_CORE=0; RLIMIT_NPROC=0 only when seccomp is missing (it also blocks
     threads, and root ignores it).
  3. Landlock: file writes, creation and deletion only under the sandbox's temp dir; with ABI>=4 no
     TCP bind/connect; with ABI>=6 no signals to (or abstract sockets of) processes outside.
  4. seccomp-BPF: socket/socketpair, execve, fork/vfork/non-thread clone, ptrace, mount, unshare,
     module/kexec/bpf/io_uring/keyctl fail with EPERM (clone3 with ENOSYS so libc uses clone).
Protocol on the original stdin/stdout (fd 1 is pointed at stderr so user prints cannot corrupt
it): 4-byte big-endian length + JSON, one reply per request.
"""
import ast
import ctypes
import inspect
import json
import math
import numbers
import os
import platform
import resource
import struct
import sys
import traceback

LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x40000000, 0x00010000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# Validator's fixed smoke-test strings (validator/utils/reward_functions.py).
SMOKE_COMPLETIONS = ["Gradients.io is the best 0-expertise AI training platform.",
                     "You can start training a text or image model on Gradients.io with 2 clicks."]

# ---------------------------------------------------------------------------- confinement
def isolate_network() -> bool:
    return LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def apply_rlimits(limits: dict, have_seccomp: bool) -> None:
    mem = limits["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not have_seccomp:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def arm_cpu_limit(seconds: float) -> None:
    """SIGXCPU kills us once this call has used `seconds` more CPU (the wall timeout in the
    parent is the authority; this only stops a CPU burner early)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = used.ru_utime + used.ru_stime
    resource.setrlimit(resource.RLIMIT_CPU, (int(spent + seconds) + 1, resource.RLIM_INFINITY))


def landlock(write_dir: str) -> int:
    """Restricts writes to `write_dir` (and /dev/null); returns the ABI used, 0 if unavailable."""
    abi = LIBC.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, VERSION)
    if abi <= 0:
        return 0
    fs_write = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write/remove/make_*
    if abi >= 2:
        fs_write |= 1 << 13  # REFER
    if abi >= 3:
        fs_write |= 1 << 14  # TRUNCATE
    fields = [fs_write]
    if abi >= 4:
        fields.append(0b11)  # handled_access_net: BIND_TCP | CONNECT_TCP, and no rule allows any
    if abi >= 6:
        fields.append(0b11)  # scoped: ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack(f"{len(fields)}Q", *fields)
    fd = LIBC.syscall(444, ctypes.c_char_p(attr), len(attr), 0)
    if fd < 0:
        return 0
    for path, access in ((write_dir, fs_write), ("/dev/null", (1 << 1) | ((1 << 14) if abi >= 3 else 0))):
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", access, pfd)  # landlock_path_beneath_attr (packed)
        LIBC.syscall(445, fd, 1, ctypes.c_char_p(rule), 0)
        os.close(pfd)
    LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    ok = LIBC.syscall(446, fd, 0) == 0
    os.close(fd)
    return abi if ok else 0


DENY = {  # name: (x86_64, aarch64); None where the arch has no such call
    "socket": (41, 198), "socketpair": (53, 199), "execve": (59, 221), "execveat": (322, 281),
    "fork": (57, None), "vfork": (58, None), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268), "reboot": (169, 142),
    "kexec_load": (246, 104), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
}
ARCHES = {"x86_64": (0, 0xC000003E, 56), "aarch64": (1, 0xC00000B7, 220)}  # column, AUDIT_ARCH, clone


def seccomp() -> bool:
    arch = ARCHES.get(platform.machine())
    if arch is None:
        return False
    col, audit_arch, clone_nr = arch
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if col == 0:  # x32 ABI syscalls alias the x86_64 ones: refuse them all
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]
    for numbers_ in DENY.values():
        if numbers_[col] is not None:
            prog += [(jeq, 0, 1, numbers_[col]), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, 435), (ret, 0, 0, enosys),           # clone3: libc falls back to clone
             (jeq, 0, 4, clone_nr), (ld, 0, 0, 16),            # clone: args[0] (flags, low word)
             (jset, 0, 1, CLONE_THREAD), (ret, 0, 0, allow),   # threads are fine ...
             (ret, 0, 0, eperm), (ret, 0, 0, allow)]           # ... new processes are not
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0


# ---------------------------------------------------------------------------- reward functions
def load_function(source: str):
    """(callable, supports_extra_data) or raises ValueError with a readable reason. Mirrors the
    validator: exec the source, take the first callable it defines, smoke-test it."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"does not parse: {exc.msg} (line {exc.lineno})")
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not defs:
        raise ValueError("defines no function")
    namespace: dict = {}
    try:
        exec(compile(tree, "<reward_func>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - anything the module-level code raises
        raise ValueError(f"fails when loaded: {type(exc).__name__}: {exc}")
    func = next((v for k, v in namespace.items() if callable(v)), None)
    if func is None:
        raise ValueError("defines no callable")
    params = inspect.signature(func).parameters
    if "completions" not in params:
        raise ValueError(f"{getattr(func, '__name__', 'function')}() has no `completions` parameter")
    return func, "extra_data" in params


def check_rewards(result, n: int) -> list[float]:
    if not isinstance(result, (list, tuple)):
        raise ValueError(f"returned {type(result).__name__}, not a list")
    if len(result) != n:
        raise ValueError(f"returned {len(result)} rewards for {n} completions")
    out = []
    for r in result:
        if not isinstance(r, numbers.Number):
            raise ValueError(f"returned a non-number reward {type(r).__name__}")
        r = float(r)
        out.append(r if math.isfinite(r) else 0.0)
    return out


def smoke_test(func, supports_extra: bool, sample: list[dict]) -> None:
    """The validator's check (validate_reward_function): with up to 10 dataset rows, the prompts
    stand in for completions (plus extra_data when the function takes it); else two fixed strings."""
    if supports_extra and sample:
        rows = [r for r in sample if "extra_data" in r]
        if rows:
            prompts = [r.get("prompt") for r in rows]
            check_rewards(func(prompts, extra_data=[r["extra_data"] for r in rows]), len(rows))
        return
    completions = [r.get("prompt", "Sample prompt") for r in sample] if sample else list(SMOKE_COMPLETIONS)
    check_rewards(func(completions), len(completions))


def serve(inp, out, limits: dict, confinement: dict) -> None:
    funcs: list = []

    def send(obj) -> None:
        data = json.dumps(obj).encode()
        out.write(struct.pack(">I", len(data)) + data)
        out.flush()

    send({"hello": confinement})
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        req = json.loads(inp.read(struct.unpack(">I", head)[0]))
        arm_cpu_limit(limits["cpu_seconds"])
        try:
            if req["op"] == "load":
                try:
                    func, extra = load_function(req["source"])
                except ValueError as exc:
                    send({"ok": False, "error": str(exc)})
                    continue
                if req.get("smoke", True):
                    smoke_test(func, extra, req.get("sample") or [])
                funcs.append((func, extra))
                send({"ok": True, "name": getattr(func, "__name__", "reward"), "extra_data": extra})
            else:  # call
                func, _ = funcs[req["fn"]]
                completions = req["completions"]
                send({"ok": True, "rewards": check_rewards(func(completions, **req["kwargs"]), len(completions))})
        except MemoryError:
            send({"ok": False, "error": "MemoryError: over the sandbox memory limit"})
        except BaseException as exc:  # noqa: BLE001 - report everything, keep serving
            if isinstance(exc, KeyboardInterrupt):
                raise
            where = traceback.extract_tb(exc.__traceback__)[-1:]
            line = f" (line {where[0].lineno})" if where and where[0].filename == "<reward_func>" else ""
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}{line}"[:500]})


def main() -> None:
    limits = json.loads(sys.argv[1])
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # user prints go to stderr, never into the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    netns = isolate_network()
    os.chdir(limits["work_dir"])
    os.environ["HOME"] = os.environ["TMPDIR"] = limits["work_dir"]
    fs = landlock(limits["work_dir"])
    sc = seccomp()
    apply_rlimits(limits, sc)
    serve(inp, out, limits, {"netns": netns, "landlock_abi": fs, "seccomp": sc})


if __name__ == "__main__":
    main()
