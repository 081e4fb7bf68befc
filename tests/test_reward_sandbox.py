"""Hostile GRPO reward functions (issue #8's list): each scores 0 for the samples it fails on,
the failure is counted with its reason, the side effect does not happen, and the sandbox keeps
serving the other functions. Small limits keep every case under ~2 s."""
import dataclasses
import os
import socket
import textwrap
import threading
import time

import pytest

from trainers.reward_sandbox import RewardSandbox, SandboxLimits, check_reward_functions, usable_reward_problem

LIMITS = SandboxLimits(call_timeout_s=1.0, load_timeout_s=1.5, cpu_seconds=1, memory_bytes=768 << 20,
                       max_consecutive_failures=2)
GOOD = "def length_reward(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"


def hostile(body: str) -> str:
    """A reward that does `body` for the completion 'x' and returns 1.0 for the others."""
    return ("def hostile(completions, **kwargs):\n    out = []\n    for c in completions:\n"
            "        if c == 'x':\n" + textwrap.indent(textwrap.dedent(body).strip(), " " * 12) + "\n"
            "        out.append(1.0)\n    return out\n")


def run_case(body: str, batch=("ok", "x", "ok")):
    with RewardSandbox([GOOD, hostile(body)], LIMITS) as box:
        assert [r.ok for r in box.reports] == [True, True], box.reports
        t0 = time.monotonic()
        rewards = box.call(1, list(batch))
        elapsed = time.monotonic() - t0
        after = box.call(0, ["abc"])  # the sandbox still serves the good function
        return rewards, box.failure_summary(), elapsed, after


def reasons(summary) -> str:
    return " | ".join(r for per_fn in summary["failed_samples"].values() for r in per_fn)


def test_function_that_does_not_parse_is_reported_at_load():
    with RewardSandbox([GOOD, "def broken(completions:\n    return [1.0]\n"], LIMITS) as box:
        good, bad = box.reports
        assert good.ok and not bad.ok
        assert "does not parse" in bad.reason and bad.name == "broken"
        assert box.call(1, ["a", "b"]) == [0.0, 0.0]
        assert box.call(0, ["ab"]) == [2.0]
    assert usable_reward_problem([bad], [1.0]).startswith("no usable reward function (broken: does not parse")
    assert usable_reward_problem([good, bad], [1.0, 1.0]) is None


def test_function_without_completions_parameter_is_reported():
    reports = check_reward_functions({"reward_functions": [
        {"reward_func": "def r(texts, **kwargs):\n    return [1.0] * len(texts)\n", "reward_weight": 1.0}]},
        limits=LIMITS)
    assert not reports[0].ok and "no `completions` parameter" in reports[0].reason
    assert "no usable reward function" in usable_reward_problem(reports, [1.0])


def test_function_that_raises_scores_zero_for_that_sample_only():
    rewards, summary, _, after = run_case("raise ValueError('bad completion')")
    assert rewards == [1.0, 0.0, 1.0]
    assert "ValueError: bad completion" in reasons(summary) and summary["failed_samples"]["hostile#1"]
    assert after == [3.0]


def test_function_that_loops_forever_times_out_and_is_switched_off():
    limits = dataclasses.replace(LIMITS, call_timeout_s=0.5, load_timeout_s=0.7)
    with RewardSandbox([GOOD, hostile("while True:\n    pass")], limits) as box:
        t0 = time.monotonic()
        assert box.call(1, ["x", "ok"]) == [0.0, 0.0]
        assert time.monotonic() - t0 < limits.call_timeout_s + 0.5
        assert box.call(0, ["abc"]) == [3.0]  # a fresh worker took over
        box.call(1, ["x"])
        summary = box.failure_summary()
        assert summary["switched_off"] == ["hostile#1"]
        assert summary["failed_samples"]["hostile#1"]["timed out after 0.5 s"] == 3
        t0 = time.monotonic()
        assert box.call(1, ["ok"]) == [0.0] and time.monotonic() - t0 < 0.1


def test_function_that_hangs_at_load_time_is_reported():
    limits = dataclasses.replace(LIMITS, load_timeout_s=0.7)
    with RewardSandbox(["import time\ntime.sleep(60)\n" + GOOD, GOOD], limits) as box:
        assert not box.reports[0].ok and "timed out" in box.reports[0].reason
        assert box.reports[1].ok and box.call(1, ["abcd"]) == [4.0]


def test_function_that_allocates_50_gb_gets_memory_error():
    rewards, summary, _, after = run_case("blob = bytearray(50 * 1024 ** 3)")
    assert rewards == [1.0, 0.0, 1.0]
    assert "memory limit" in reasons(summary)
    assert after == [3.0]


def test_function_that_opens_a_socket_reaches_nothing(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(1.0)
    port = server.getsockname()[1]
    accepted = []
    waiter = threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True)
    waiter.start()
    rewards, summary, _, _ = run_case(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)")
    waiter.join(3)
    server.close()
    assert rewards == [1.0, 0.0, 1.0] and accepted == [False]
    assert "Error" in reasons(summary)


def _accept(server) -> bool:
    try:
        server.accept()[0].close()
        return True
    except OSError:
        return False


def test_function_that_writes_outside_its_sandbox_is_stopped(tmp_path):
    target = tmp_path / "escaped.txt"
    rewards, summary, _, _ = run_case(f"open({str(target)!r}, 'w').write('pwned')")
    assert rewards == [1.0, 0.0, 1.0]
    assert not target.exists()
    assert "Permission" in reasons(summary)


def test_function_that_forks_cannot_start_processes(tmp_path):
    marker = tmp_path / "child-ran"
    body = f"""
import os, subprocess
try:
    subprocess.run(['touch', {str(marker)!r}])
finally:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
"""
    rewards, summary, _, _ = run_case(body)
    assert rewards == [1.0, 0.0, 1.0]
    assert not marker.exists()
    assert "Operation not permitted" in reasons(summary) or "Permission" in reasons(summary)


def test_function_cannot_signal_the_trainer():
    rewards, summary, _, _ = run_case(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert rewards == [1.0, 0.0, 1.0]  # and this test process is still alive to check it
    assert reasons(summary)


def test_validator_smoke_test_uses_extra_data_rows():
    src = ("def needs_answers(completions, extra_data, **kwargs):\n"
           "    return [1.0 if e == 'ok' else 0.0 for e in extra_data]\n")
    rows = [{"prompt": "Q1", "extra_data": "ok"}, {"prompt": "Q2", "extra_data": "no"}]
    with RewardSandbox([src], LIMITS, sample_rows=rows) as box:
        assert box.reports[0].ok and box.reports[0].supports_extra_data
        assert box.call(0, ["a", "b"], {"extra_data": ["no", "ok"]}) == [0.0, 1.0]
    with RewardSandbox([src], LIMITS) as box:  # without rows: the fixed strings, and no extra_data
        assert not box.reports[0].ok and "extra_data" in box.reports[0].reason


@pytest.mark.parametrize("result,why", [("'nope'", "not a list"), ("[]", "0 rewards for 1"),
                                        ("['a'] * len(completions)", "non-number")])
def test_malformed_results_score_zero(result, why):
    src = f"def r(completions, **kwargs):\n    return {result} if completions[0] == 'x' else [0.5] * len(completions)\n"
    with RewardSandbox([src], LIMITS) as box:
        assert box.call(0, ["x", "y"]) == [0.0, 0.5]  # retried one by one: only 'x' fails
        assert why in reasons(box.failure_summary())
