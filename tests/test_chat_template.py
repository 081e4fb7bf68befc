"""Chat tasks with chat_template="tokenizer_default" (continuous-SFT boss tasks): the base
tokenizer's own jinja template, rendered as axolotl renders it (apply_chat_template, tokenised
without added special tokens), labels on assistant turns + the EOS the template writes after
them. Expectations are assembled piece by piece here, not with the renderer's helpers."""
import pytest
from conftest import BENCH

from cluster.planning.dataset_checks import check_request
from trainers.chat_format import tokenize_chat, tokenize_rows
from trainers.formats import tokenize_task
from trainers.instruct_format import IGNORE, DatasetError
from trainers.modeling import load_tokenizer

PICO = BENCH / "models" / "pico-llama"
pytestmark = pytest.mark.skipif(not (PICO / "config.json").exists(), reason="needs ../shared/bench")
BOS, EOS = 1, 0  # <|im_start|> made the BOS below; <|endoftext|> is pico-llama's EOS
# distinctive: a BOS, "[role]" headers, the EOS closing every message, nothing like chatml
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}[assistant]\n{% endif %}")
DT = {"chat_template": "tokenizer_default", "chat_column": "conversations", "chat_role_field": "from",
      "chat_content_field": "value", "chat_user_reference": "human", "chat_assistant_reference": "gpt"}
ROWS = [
    {"conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "Hi! How can I help?"}]},
    {"system": "Be terse.",
     "conversations": [{"from": "human", "value": "ünïcødé 你好 <|im_end|> a\nb"},
                       {"from": "gpt", "value": "Noted:\n- one\n- two"},
                       {"from": "human", "value": "And 12345?"},
                       {"from": "gpt", "value": "Digits, split one by one."}]},
]


@pytest.fixture()
def tok():
    t = load_tokenizer(str(PICO))
    t.chat_template = TEMPLATE
    t.bos_token = "<|im_start|>"
    assert (t.bos_token_id, t.eos_token_id) == (BOS, EOS)
    return t


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _messages(row):
    roles = {"human": "user", "gpt": "assistant"}
    turns = [{"role": "system", "content": row["system"]}] if "system" in row else []
    return turns + [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]


def test_tokenizer_default_renders_the_tokenizers_own_template(tok):
    for row in ROWS:
        ids, labels = [BOS], [IGNORE]
        for m in _messages(row):
            head, body, tail = _ids(tok, f"[{m['role']}]\n"), _ids(tok, m["content"]), [EOS] + _ids(tok, "\n")
            ids += head + body + tail
            trained = m["role"] == "assistant"
            labels += [IGNORE] * len(head) + (body if trained else [IGNORE] * len(body)) \
                + [EOS if trained else IGNORE] + [IGNORE] * (len(tail) - 1)
        ex = tokenize_chat(row, DT, tok, 4096)
        assert ex.input_ids == ids == tok.apply_chat_template(_messages(row), tokenize=True, return_dict=False)
        assert ex.labels == labels  # assistant content + the EOS right after it (axolotl's train_on_eos "turn")
        assert ex.input_ids.count(BOS) == 1  # the template's BOS only: none added when tokenising


def test_a_tokenizer_without_a_chat_template_is_a_dataset_error(tok):
    tok.chat_template = None
    with pytest.raises(DatasetError, match="the base tokenizer has no chat template"):
        tokenize_rows(ROWS, DT, tok, 4096)
    with pytest.raises(DatasetError, match="the base tokenizer has no chat template"):
        tokenize_task("ChatTask", ROWS, DT, tok, None)


def test_other_template_names(tok):
    chatml = {**DT, "chat_template": "chatml"}
    fallback = {**DT, "chat_template": "tokenizer_default_fallback_chatml"}
    assert tokenize_chat(ROWS[1], fallback, tok, 4096) == tokenize_chat(ROWS[1], DT, tok, 4096)  # has its own
    tok.chat_template = None
    assert tokenize_chat(ROWS[1], fallback, tok, 4096) == tokenize_chat(ROWS[1], chatml, tok, 4096)
    with pytest.raises(DatasetError, match="chat_template 'llama3' is not supported"):
        tokenize_rows(ROWS, {**DT, "chat_template": "llama3"}, tok, 4096)


def test_start_training_accepts_tokenizer_default_and_refuses_unknown_names():
    assert check_request("https://s3/x.json", DT) is None
    assert check_request("https://s3/x.json", {**DT, "chat_template": "chatml"}) is None
    assert "chat_template 'llama3' is not supported" in check_request("https://s3/x.json",
                                                                      {**DT, "chat_template": "llama3"})


def test_spans_come_from_the_conversation_up_to_each_turn_as_axolotl_finds_them(tok):
    """Qwen3's template writes an empty <think> block only on an assistant turn that is last and
    after the last user turn. axolotl finds each turn's span on the conversation up to that turn
    (where it IS last) and applies it to the whole conversation's tokens, so an earlier turn's
    labels land where the validator puts them: shifted by the block, here onto the last turn's
    header. Mirrored, not corrected: this is what the loss is computed on."""
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (
        "{%- set ns = namespace(q=0) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.q = loop.index0 %}"
        "{%- endif %}{%- endfor %}{%- for m in messages %}{%- if m.role == 'assistant' and loop.index0 > ns.q and "
        "loop.last %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}"
        "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}")
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "first answer here"},
                             {"from": "human", "value": "more"}, {"from": "gpt", "value": "second answer"}]}
    ex = tokenize_chat(row, DT, tok, 4096)
    assert tok.decode(ex.input_ids).count("<think>") == 1  # only on the last turn
    labelled = [tok.decode([t]) for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    # "first answer here" is found at 21..23 in its own prefix (12 think-block tokens in), which in
    # the whole conversation is the last turn's "assistant\n<"; its EOS is too far to be labelled
    assert labelled == ["assistant", "\n", "<", "se", "cond", " answer", "<|im_end|>"]
