import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.config import TrainConfig
from trainers.formats import length_candidates, sequence_lengths, tokenize_task
from trainers.instruct_format import (
    IGNORE,
    DatasetError,
    eval_sequence_length,
    render_prompt,
    tokenize_instruct,
    tokenize_rows,
)
from trainers.launch import fit
from trainers.modeling import load_tokenizer

DT = {"system_prompt": "", "system_format": "{system}", "field_system": None, "field_instruction": "instruct",
      "field_input": "input", "field_output": "output", "format": None, "no_input_format": None, "field": None}


def test_prompt_rendering_matches_the_validator_defaults():
    assert render_prompt({"instruct": "Unscramble", "input": "olleh", "output": "x"}, DT) == "Unscramble olleh"
    assert render_prompt({"instruct": "Unscramble", "input": "", "output": "x"}, DT) == "Unscramble"
    custom = {**DT, "format": "Q: {instruction}\n{input}\nA:", "no_input_format": "Q: {instruction}\nA:",
              "field_system": "sys", "system_format": "[{system}] "}
    assert render_prompt({"instruct": "i", "input": "n", "sys": "be brief"}, custom) == "[be brief] Q: i\nn\nA:"
    assert render_prompt({"instruct": "i", "input": "", "sys": ""}, custom) == "Q: i\nA:"


def test_eval_length_is_halved_for_short_context_models():
    assert eval_sequence_length(2048) == 1024
    assert eval_sequence_length(4095) == 2048
    assert eval_sequence_length(8192) == 4096
    assert eval_sequence_length(None) == 4096


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_labels_cover_output_and_eos_only(tiny_models, family):
    tok = load_tokenizer(str(tiny_models[family]))
    row = {"instruct": "Unscramble the word", "input": "dlrow", "output": "world"}
    ex = tokenize_instruct(row, DT, tok, max_len=512)
    prompt_ids = tok("Unscramble the word dlrow")["input_ids"]
    output_ids = tok("world")["input_ids"]
    if tok.bos_token_id is not None and output_ids[0] == tok.bos_token_id and output_ids[0] != tok.eos_token_id:
        output_ids = output_ids[1:]  # the output loses the BOS the tokenizer adds
    assert ex.input_ids == prompt_ids + output_ids + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(prompt_ids) + output_ids + [tok.eos_token_id]


def test_bos_adding_tokenizer_keeps_bos_on_the_prompt_only(tiny_models):
    tok = load_tokenizer(str(tiny_models["llama"]))  # built with a BOS post-processor
    ex = tokenize_instruct({"instruct": "a", "input": "", "output": "b"}, DT, tok, max_len=64)
    assert ex.input_ids[0] == tok.bos_token_id
    assert ex.input_ids.count(tok.bos_token_id) == 1


def test_too_long_rows_are_dropped_and_bad_rows_explained(tiny_models):
    tok = load_tokenizer(str(tiny_models["qwen2"]))
    rows = [{"instruct": "short", "input": "", "output": "ok"}, {"instruct": "long " * 400, "input": "", "output": "x"}]
    examples, dropped = tokenize_rows(rows, DT, tok, max_len=64)
    assert (len(examples), dropped) == (1, 1)
    with pytest.raises(DatasetError, match="lacks column"):
        tokenize_rows([{"question": "q", "answer": "a"}], DT, tok, 64)
    with pytest.raises(DatasetError, match="must hold strings"):
        tokenize_rows([{"instruct": 3, "input": "", "output": "a"}], DT, tok, 64)
    with pytest.raises(DatasetError, match="no trainable rows"):
        tokenize_rows([rows[1]], DT, tok, 64)


def test_length_candidates_double_up_to_the_cap():
    assert length_candidates(4096, 131072) == [4096, 8192, 16384, 32768, 65536, 131072]
    assert length_candidates(4096, 10000) == [4096, 8192, 10000]
    assert length_candidates(4096, 2048) == [2048]
    assert length_candidates(0, 0) == [2048, 4096, 8192]


def test_cap_is_the_smaller_of_positions_and_a_real_tokenizer_limit():
    class Tok:
        model_max_length = 2048

    config = LlamaConfig(max_position_embeddings=32768)
    assert sequence_lengths("ChatTask", config, Tok()) == [2048]           # 4096 > the cap: the cap alone
    Tok.model_max_length = int(1e30)                                       # "no limit" placeholder: ignored
    assert sequence_lengths("InstructTextTask", config, Tok()) == [4096, 8192, 16384, 32768]
    assert sequence_lengths("InstructTextTask", object(), Tok())[-1] == 131072  # no max_position_embeddings


def _short_context_model(path, tok, positions):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return config


def test_rows_longer_than_the_first_length_train_at_the_doubled_one(tiny_models, tmp_path):
    """max_position_embeddings 128: the validator tries 64, then 128 when no row fits 64."""
    tok = load_tokenizer(str(tiny_models["qwen2"]))
    config = _short_context_model(tmp_path / "model", tok, 128)
    assert sequence_lengths("InstructTextTask", config, tok) == [64, 128]
    rows = [{"instruct": "Unscramble the word " * n, "input": "", "output": f"world {n}"} for n in range(9, 17)]
    lengths = [len(tokenize_instruct(r, DT, tok, 10**6)) for r in rows]
    assert min(lengths) > 64 and max(lengths) <= 128, lengths
    data = tokenize_task("InstructTextTask", rows, DT, tok, config, log=lambda *_: None)
    assert (data.max_len, len(data.examples), data.dropped) == (128, len(rows), 0)
    short = {"instruct": "Unscramble", "input": "", "output": "ok"}  # one row fits 64: 64 it is, as evaluated
    data = tokenize_task("InstructTextTask", rows + [short], DT, tok, config)
    assert (data.max_len, len(data.examples), data.dropped) == (64, 1, len(rows))

    (tmp_path / "train.json").write_text(json.dumps(rows))
    cfg = TrainConfig(model_path=str(tmp_path / "model"), train_file=str(tmp_path / "train.json"), dataset_type=DT,
                      run_dir=str(tmp_path / "runs"), run_name="doubled", num_workers=0, method="full", lr=1e-3,
                      epochs=1, saves=1, batch_tokens=512)
    outcome = fit(cfg, tmp_path / "out")
    assert outcome.summary["max_len"] == 128 and outcome.summary["dropped_for_length"] == 0
    assert outcome.summary["steps"] >= 1

    too_long = [{"instruct": "Unscramble the word " * 20, "input": "", "output": "x"}] * 3
    with pytest.raises(DatasetError, match="all 3 rows exceed 128 tokens"):
        tokenize_task("InstructTextTask", too_long, DT, tok, config)
