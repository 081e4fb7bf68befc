"""Our DPO per-pair loss equals the newest evaluator's (G.O.D validator/evaluation/evaluators/
dpo.py, the per-pair vector the boss and knockout rounds compare), written out here from its
rules: EOS text appended unless present, prompt tokenised alone and prompt + completion in one
piece (special tokens on), completion = the suffix after the prompt's tokens, the sequence cut
to max_position_embeddings, log-probs summed from position max(prompt_len - 1, 0) of the shifted
view, loss = -logsigmoid(0.1 * margin); a pair with no completion token left is NaN there and
dropped by us. Two tiny random models (policy, reference) on pico-llama's tokenizer."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BENCH
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM

from trainers.batching import make_batches
from trainers.dpo import dpo_per_sample, fill_reference
from trainers.formats import sequence_lengths, tokenize_task
from trainers.modeling import load_tokenizer

PICO = BENCH / "models" / "pico-llama"
pytestmark = pytest.mark.skipif(not (PICO / "config.json").exists(), reason="needs ../shared/bench")
DT = {"field_prompt": "prompt", "field_system": None, "field_chosen": "chosen", "field_rejected": "rejected",
      "prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}"}
MAX_POS = 48
ROWS = [
    {"prompt": "Is the sky blue?", "chosen": " Yes, it is.", "rejected": " No."},
    {"prompt": "word " * 60, "chosen": "too late", "rejected": "never scored"},             # prompt > max: NaN
    {"prompt": "count: " + "one two three " * 13, "chosen": " four five six seven eight nine ten",
     "rejected": " zero"},                                                                  # cut inside completions
    {"prompt": "ünïcødé 你好\n<|im_end|>\nsay:", "chosen": "<|im_start|>ok\n\n",
     "rejected": "ñ 🙂\t<|im_end|>"},                                                       # special-token strings, newlines
    {"prompt": "", "chosen": "An answer with no prompt.", "rejected": "Another."},            # empty prompt
    {"prompt": "Say nothing.", "chosen": "", "rejected": "Something."},                     # empty chosen: EOS only
    {"prompt": "Done?", "chosen": " yes<|endoftext|>", "rejected": " no"},                  # already ends with EOS
    {"prompt": "The answer is ", "chosen": "yes, because it is", "rejected": "no"},         # merge across the edge
]


def reference_tokenize(tokenizer, prompt, chosen, rejected):
    eos = tokenizer.eos_token
    if not chosen.endswith(eos):
        chosen = chosen + eos
    if not rejected.endswith(eos):
        rejected = rejected + eos
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    n = len(prompt_ids)
    prompt_chosen_ids = tokenizer(text=prompt + chosen)["input_ids"]
    prompt_rejected_ids = tokenizer(text=prompt + rejected)["input_ids"]
    return prompt_ids, prompt_chosen_ids[n:], prompt_rejected_ids[n:]


@torch.no_grad()
def reference_logprob(model, prompt_ids, completion_ids, max_length):
    ids = (prompt_ids + completion_ids)[:max_length]
    prompt_len = min(len(prompt_ids), max_length)
    if len(ids) <= prompt_len:
        return None
    input_ids = torch.tensor([ids])
    logits = model(input_ids=input_ids).logits.float()
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    token_log_probs = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return token_log_probs[0, max(prompt_len - 1, 0):].sum().item()


def reference_loss(policy, reference, tokenizer, row, max_length):
    prompt, chosen, rejected = reference_tokenize(tokenizer, row["prompt"], row["chosen"], row["rejected"])
    logps = [reference_logprob(m, prompt, c, max_length) for m in (policy, reference) for c in (chosen, rejected)]
    if any(v is None for v in logps):
        return math.nan
    pc, pr, rc, rr = logps
    return -F.logsigmoid(torch.tensor(0.1 * ((pc - rc) - (pr - rr)))).item()


def _model(seed, vocab):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_POS)
    return LlamaForCausalLM(config).eval()


def _bos_adding(tok):
    """pico-llama's tokenizer made to add a BOS (<|im_start|>) as Llama-3 tokenizers do."""
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)])
    tok.bos_token = "<|im_start|>"
    assert tok("x")["input_ids"][0] == 1 and tok("")["input_ids"] == [1]
    return tok


@pytest.mark.parametrize("bos", [False, True])
def test_per_pair_loss_equals_the_evaluators(bos):
    tok = load_tokenizer(str(PICO))
    tok = _bos_adding(tok) if bos else tok
    policy, reference = _model(0, len(tok)), _model(1, len(tok))
    assert sequence_lengths("DpoTask", policy.config, tok) == [MAX_POS]
    expected = [reference_loss(policy, reference, tok, row, MAX_POS) for row in ROWS]
    assert math.isnan(expected[1]) and sum(map(math.isnan, expected)) == 1

    data = tokenize_task("DpoTask", ROWS, DT, tok, policy.config)
    assert (data.dropped, data.max_len, len(data.examples)) == (1, MAX_POS, len(ROWS) - 1)
    examples = data.examples
    for batch in make_batches(examples, 4 * MAX_POS, 4, seed=0):  # padded batches, as in training
        fill_reference(reference, batch, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        ours = [loss for batch in [examples[:3], examples[3:]]
                for loss in dpo_per_sample(policy, batch, tok.pad_token_id, torch.device("cpu")).tolist()]
    kept = [e for e in expected if not math.isnan(e)]
    assert ours == pytest.approx(kept, abs=1e-5)
    assert max(abs(x - math.log(2)) for x in kept) > 1e-3  # the two models do differ: not ln 2 everywhere


def test_dpo_length_is_the_models_positions_or_8192():
    class NoPositions:
        pass

    assert sequence_lengths("DpoTask", NoPositions(), None) == [8192]
    assert sequence_lengths("DpoTask", LlamaConfig(max_position_embeddings=32768), None) == [32768]
