"""Templates and tokenisation: exact token layout, response-only loss masks, truncation order."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from fedlora_jax.data import DataError, Example, load_dolly, tokenize_examples
from fedlora_jax.data.templates import ALPACA_NO_CONTEXT, ALPACA_WITH_CONTEXT


@pytest.fixture(scope="module")
def stories_tok(stories_dir):
    """The shipped stories260K SentencePiece tokenizer (512 pieces, so text costs many tokens:
    the lengths below are about three times what a 32k-piece Llama tokenizer would need)."""
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def sample():
    """Dolly rows with and without context (fixed stride, so every category appears)."""
    return load_dolly(verbose=False).examples[::751]


def decode(tok, ids) -> str:
    return tok.decode(np.asarray(ids).tolist())


def test_alpaca_text_is_the_standard_one():
    assert ALPACA_WITH_CONTEXT.format(instruction="I", context="C") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nI\n\n### Input:\nC\n\n### Response:\n"
    )
    assert ALPACA_NO_CONTEXT.format(instruction="I") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nI\n\n### Response:\n"
    )


def test_layout_matches_independent_encoding(stories_tok, sample):
    """Rows that fit are exactly BOS + encode(prompt + response) + EOS, mask on the response."""
    tok = stories_tok
    ts, drops = tokenize_examples(sample, tok, max_seq_len=2048)
    assert drops == {} and len(ts) == len(sample)
    assert any(e.context for e in sample) and any(not e.context for e in sample)
    for i, ex in enumerate(sample):
        fmt = ALPACA_WITH_CONTEXT if ex.context else ALPACA_NO_CONTEXT
        prompt = fmt.format(instruction=ex.instruction, context=ex.context)
        want = [
            tok.bos_token_id,
            *tok(prompt + ex.response, add_special_tokens=False)["input_ids"],
            tok.eos_token_id,
        ]
        n = ts.lengths[i]
        assert ts.tokens[i, :n].tolist() == want
        assert (ts.tokens[i, n:] == ts.pad_id).all()
        # The loss mask covers exactly the response text and EOS.
        mask = ts.loss_mask()[i].astype(bool)
        assert decode(tok, ts.tokens[i][mask]) == ex.response + tok.eos_token
        assert decode(tok, ts.tokens[i, 1 : ts.prompt_lengths[i]]) == prompt.rstrip(" ")
        assert ts.attn_mask()[i].sum() == n and ts.tokens.dtype == np.int32


def _row(instruction: str, context: str, response: str) -> Example:
    return Example(instruction, context, response, "c", 1)


WORDS = " ".join(f"w{i}" for i in range(400))


def test_truncation_cuts_context_first_and_keeps_response(stories_tok):
    ex = _row("Summarise the passage.", WORDS, "A short summary.")
    ts, drops = tokenize_examples([ex], stories_tok, max_seq_len=256)
    assert drops == {} and ts.lengths[0] == 256
    mask = ts.loss_mask()[0].astype(bool)
    assert decode(stories_tok, ts.tokens[0][mask]) == "A short summary.</s>"
    prompt = decode(stories_tok, ts.tokens[0, 1 : ts.prompt_lengths[0]])
    head, cut = prompt.split("### Input:\n")
    assert "Summarise the passage." in head
    kept = cut.removesuffix("\n\n### Response:\n")
    assert len(kept) > 50 and WORDS.startswith(kept)


def test_truncation_cuts_response_end_after_dropping_context(stories_tok):
    ex = _row("Write a long list.", "some context", WORDS)
    ts, _ = tokenize_examples([ex], stories_tok, max_seq_len=160, min_response_tokens=16)
    assert ts.lengths[0] == 160
    response = decode(stories_tok, ts.tokens[0][ts.loss_mask()[0].astype(bool)])
    assert WORDS.startswith(response) and not response.endswith("</s>")  # no EOS when cut
    prompt = decode(stories_tok, ts.tokens[0, 1 : ts.prompt_lengths[0]])
    assert "### Input" not in prompt and "some context" not in prompt  # no-context prompt
    assert "Write a long list." in prompt


def test_truncation_cuts_instruction_keeping_minimum_then_drops(stories_tok):
    ex = _row(WORDS, "", "Fine.")
    ts, drops = tokenize_examples([ex], stories_tok, max_seq_len=150, min_instruction_tokens=16)
    assert drops == {} and ts.lengths[0] == 150
    assert decode(stories_tok, ts.tokens[0][ts.loss_mask()[0].astype(bool)]) == "Fine.</s>"
    instruction = (
        decode(stories_tok, ts.tokens[0, 1 : ts.prompt_lengths[0]])
        .split("### Instruction:\n")[1]
        .split("\n\n### Response")[0]
    )
    assert WORDS.startswith(instruction) and len(instruction) > 20
    # Too small to keep 16 instruction tokens and a 16-token response: dropped and counted.
    long_both = _row(WORDS, "", WORDS)
    ts, drops = tokenize_examples([ex, long_both], stories_tok, max_seq_len=124)
    assert drops == {"too_long": 1} and ts.row_ids.tolist() == [0]
    ts, drops = tokenize_examples([ex], stories_tok, max_seq_len=100)
    assert drops == {"too_long": 1} and len(ts) == 0


def test_prompt_only_set(stories_tok, sample):
    ts, _ = tokenize_examples(sample, stories_tok, max_seq_len=1024, with_response=False)
    assert (ts.lengths == ts.prompt_lengths).all() and ts.loss_mask().sum() == 0
    assert decode(stories_tok, ts.tokens[0, 1 : ts.lengths[0]]).endswith("### Response:\n")


def test_chat_template_switch(stories_dir, sample):
    tok = AutoTokenizer.from_pretrained(stories_dir)
    with pytest.raises(DataError, match="no chat template; use 'alpaca'"):
        tokenize_examples(sample, tok, max_seq_len=512, template="chat")
    tok.chat_template = (  # a fresh tokenizer: the module fixture stays template-free
        "{{ bos_token }}{% for m in messages %}"
        "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ex = next(e for e in sample if e.context)
    ts, _ = tokenize_examples([ex], tok, max_seq_len=4096, template="chat")
    assert ts.tokens[0, 0] == tok.bos_token_id and ts.tokens[0, 1] != tok.bos_token_id
    prompt = decode(tok, ts.tokens[0, 1 : ts.prompt_lengths[0]])
    assert prompt == f"<user>{ex.instruction}\n\n{ex.context}</user><assistant>"
    assert decode(tok, ts.tokens[0][ts.loss_mask()[0].astype(bool)]) == ex.response + "</s>"


def test_bad_template_value(stories_tok, sample):
    with pytest.raises(DataError, match="data.template='vicuna': allowed values are alpaca, chat"):
        tokenize_examples(sample, stories_tok, max_seq_len=64, template="vicuna")
