"""Exact token ids and label masks of bench rows, per task type, against expectations built by
hand from the validator's rule (strings assembled and tokenised piece by piece here, ids and
masks written out literally) - not by calling the renderers' own helpers."""
import json
import math

import pytest
import torch
from conftest import BENCH

from trainers.chat_format import tokenize_chat
from trainers.dpo_format import dpo_loss, sequences, tokenize_pair
from trainers.instruct_format import IGNORE, tokenize_instruct
from trainers.modeling import load_tokenizer

PICO = BENCH / "models" / "pico-llama"
pytestmark = pytest.mark.skipif(not (PICO / "config.json").exists(), reason="needs ../shared/bench")
IM_START, IM_END, EOS = 1, 2, 0  # pico-llama's special tokens (README): <|im_start|>, <|im_end|>, <|endoftext|>


def _task(name):
    meta = json.loads((BENCH / "tasks" / name / "task.json").read_text())
    return json.loads((BENCH / "tasks" / name / "test.json").read_text()), meta["dataset_type"]


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer(str(PICO))
    assert (t.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]), t.eos_token_id) == ([IM_START, IM_END], EOS)
    return t


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_instruct_rows(tok):
    rows, dt = _task("instruct_wordplay")
    with_input = next(r for r in rows if r["input"])
    without_input = next(r for r in rows if not r["input"])
    for row, prompt in [(with_input, with_input["instruct"] + " " + with_input["input"]),
                        (without_input, without_input["instruct"])]:
        p, o = _ids(tok, prompt), _ids(tok, row["output"])
        ex = tokenize_instruct(row, dt, tok, 4096)
        assert ex.input_ids == p + o + [EOS]
        assert ex.labels == [IGNORE] * len(p) + o + [EOS]
    # a literal row: "Solve ... (4)" -> "acer"; the output alone is labelled, then EOS
    row = rows[0]
    assert row["output"] == "acer"
    ex = tokenize_instruct(row, dt, tok, 4096)
    assert [t for t in ex.labels if t != IGNORE] == _ids(tok, "acer") + [0]


def test_chat_rows_with_chatml_tokens(tok):
    rows, dt = _task("chat_topical_dialogue")
    for row in rows[:3]:
        ids, labels = [], []
        for m in row["conversations"]:
            role = {"human": "user", "gpt": "assistant"}[m["from"]]
            head, body, tail = [IM_START] + _ids(tok, role + "\n"), _ids(tok, m["value"]), [IM_END] + _ids(tok, "\n")
            ids += head + body + tail
            labels += [IGNORE] * len(head) + (body if role == "assistant" else [IGNORE] * len(body)) + [IGNORE] * len(tail)
        ex = tokenize_chat(row, dt, tok, 4096)
        assert ex.input_ids == ids
        assert ex.labels == labels  # assistant text only: no <|im_end|>, no EOS (chatml emits none)


def _bpe_without_chatml_tokens(texts):
    """A byte-level BPE whose only special token is <|endoftext|>, trained on chatml text so
    that merges such as '.<|' exist (a token spanning the end of a message)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_chat_rows_for_a_tokenizer_without_chatml_tokens():
    """<|im_start|> etc. are plain text here; a token that spans the edge of an assistant turn's
    text (e.g. '.<|') is labelled, as axolotl's dummy-message diff labels it: the labels are
    exactly the tokens whose characters overlap an assistant message."""
    rows, dt = _task("chat_topical_dialogue")
    tok = _bpe_without_chatml_tokens(["".join(f"<|im_start|>{m['from']}\n{m['value']}<|im_end|>\n"
                                              for m in r["conversations"]) for r in rows[:300]])
    assert "<|im_start|>" not in tok.get_vocab()
    straddling = 0
    for row in rows[:3]:
        text, spans = "", []
        for m in row["conversations"]:
            role = {"human": "user", "gpt": "assistant"}[m["from"]]
            text += f"<|im_start|>{role}\n"
            if role == "assistant":
                spans.append((len(text), len(text) + len(m["value"])))
            text += m["value"] + "<|im_end|>\n"
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        trained = [any(s < e2 and e > s2 for s2, e2 in spans) for s, e in enc["offset_mapping"]]
        ex = tokenize_chat(row, dt, tok, 100_000)
        straddling += sum(1 for s, e in enc["offset_mapping"] if any(s < e2 < e for _, e2 in spans))
        assert ex.input_ids == enc["input_ids"]
        assert ex.labels == [t if keep else IGNORE for t, keep in zip(enc["input_ids"], trained)]
    assert straddling  # the rows above do exercise the edge case


def test_dpo_rows(tok, tiny_models):
    """The evaluator's per-pair rule: EOS text appended, prompt tokenised alone and prompt +
    completion in one piece (special tokens on), the completion = what follows the prompt's tokens."""
    rows, dt = _task("dpo_fact_verification")
    row = rows[0]
    p = tok(row["prompt"])["input_ids"]
    pc = tok(row["prompt"] + row["chosen"] + "<|endoftext|>")["input_ids"]
    pr = tok(row["prompt"] + row["rejected"] + "<|endoftext|>")["input_ids"]
    c, r = pc[len(p):], pr[len(p):]
    assert c == _ids(tok, row["chosen"]) + [EOS] and r == _ids(tok, row["rejected"]) + [EOS]  # no merge here
    ex = tokenize_pair(row, dt, tok, 8192)
    (chosen, chosen_mask), (rejected, rejected_mask) = sequences(ex)
    assert chosen == p + c and rejected == p + r
    assert chosen_mask == [0] * len(p) + [1] * len(c) and rejected_mask == [0] * len(p) + [1] * len(r)
    # system column dropped, formats not applied (as evaluated)
    fancy = {**dt, "field_system": "system", "prompt_format": "{system} {prompt}", "chosen_format": "{chosen}!"}
    assert sequences(tokenize_pair({**row, "system": "Be terse."}, fancy, tok, 8192)) == \
        [(chosen, chosen_mask), (rejected, rejected_mask)]
    # a completion that already ends with the EOS text gets no second one
    assert tokenize_pair({**row, "chosen": row["chosen"] + "<|endoftext|>"}, dt, tok, 8192).chosen == c
    # a BOS-adding tokenizer: the prompt keeps its BOS (special tokens on), the completion has none
    bos_tok = load_tokenizer(str(tiny_models["llama"]))
    assert bos_tok("x")["input_ids"][0] == bos_tok.bos_token_id
    seq = sequences(tokenize_pair(row, dt, bos_tok, 8192))[0][0]
    assert seq[0] == bos_tok.bos_token_id and seq.count(bos_tok.bos_token_id) == 1


def test_dpo_pairs_keep_their_first_max_len_tokens(tok):
    rows, dt = _task("dpo_logical_reasoning")
    row = {**rows[0], "prompt": " ".join(["word"] * 1100) + " END"}
    p = tok(row["prompt"])["input_ids"]
    c = tok(row["prompt"] + row["chosen"] + "<|endoftext|>")["input_ids"][len(p):]
    r = tok(row["prompt"] + row["rejected"] + "<|endoftext|>")["input_ids"][len(p):]
    assert len(p) > 1024 and min(len(c), len(r)) > 1  # longer than the old 512/1024 caps: kept whole
    ex = tokenize_pair(row, dt, tok, len(p) + 1)
    assert (ex.prompt, ex.chosen, ex.rejected) == (p, c[:1], r[:1])
    assert tokenize_pair(row, dt, tok, 8192).prompt == p
    # no completion token left: the validator's loss is NaN for the pair; not trained on
    assert tokenize_pair(row, dt, tok, len(p)) is None


def test_dpo_loss_is_the_sigmoid_loss_at_beta_0_1():
    policy = torch.tensor([[-3.0], [-5.0]])     # chosen, rejected summed log-probs
    reference = torch.tensor([[-4.0], [-4.5]])
    margin = (-3.0 - -4.0) - (-5.0 - -4.5)      # 1.5
    assert dpo_loss(policy, reference).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * margin))))
