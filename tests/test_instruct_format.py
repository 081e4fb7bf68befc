import pytest

from trainers.instruct_format import (IGNORE, DatasetError, eval_sequence_length, render_prompt, tokenize_instruct,
                                      tokenize_rows)
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
