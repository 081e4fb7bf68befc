"""benchmarks/throughput_grpo.py on the CPU: ours and trl each run a step of equal work and get timed."""
import json

import pytest
from conftest import BENCH

TASK, TOKENIZER = BENCH / "tasks" / "grpo_arithmetic", BENCH / "models" / "pico-llama"


@pytest.mark.skipif(not (TASK / "task.json").exists() or not (TOKENIZER / "tokenizer.json").exists(),
                    reason="needs the bench GRPO task and pico-llama in ../shared/bench")
def test_ours_and_trl_time_the_same_generated_tokens_from_the_same_prompts(tmp_path, monkeypatch):
    from benchmarks.throughput_grpo import main
    monkeypatch.setenv("BENCH_DEVICE", "cpu")  # read by each variant's process
    main(["--task", str(TASK), "--tokenizer", str(TOKENIZER), "--cases", "tiny-full", "--variants", "ours,trl",
          "--prompts-per-step", "2", "--max-completion", "4", "--warm", "1", "--timed", "1", "--out", str(tmp_path)])
    (res,) = [json.loads(ln) for ln in (tmp_path / "throughput_grpo.jsonl").read_text().splitlines()]
    ours, trl = res["ours"], res["trl"]
    assert "error" not in ours and "error" not in trl, (ours.get("error"), trl.get("error"))
    assert ours["steps_per_s"] > 0 and trl["steps_per_s"] > 0
    # 2 prompts x 2 generations x 4 tokens, EOS suppressed: the same work in both
    assert ours["gen_tokens_per_step"] == trl["gen_tokens_per_step"] == 16
    assert ours["prompts_sha1"] == trl["prompts_sha1"]
    assert (ours["rewards"], trl["rewards"]) == ("sandbox", "in-process")
    assert res["device"] == "cpu" and res["versions"]["trl"]
