"""Tokenisation with response-only loss masks and response-preserving truncation.

A row becomes ``BOS + prompt + response + EOS``; the loss covers the response tokens and EOS.
Rows are tokenised once, in batches, into fixed-width right-padded arrays so that batch assembly
is only fancy indexing. A row longer than ``max_seq_len`` is shortened in this order (our
choice; the papers are silent): the context is cut from its end (dropped entirely, with the
no-context prompt, if need be); then the response is cut at its end, keeping at least
``min_response_tokens`` (a truncated response gets no EOS: its text did not end); then the
instruction is cut from its end, keeping at least ``min_instruction_tokens``. A row that still
does not fit is dropped and counted as ``too_long``. The response goes before the instruction
because an example with a short answer still teaches the task, one without its instruction does
not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedlora_jax.data.rows import DataError, Example
from fedlora_jax.data.templates import check_template, render_prompt


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
    """Tokenised rows: ``tokens [n, width]`` int32, right-padded with ``pad_id``.

    Real tokens are ``tokens[i, :lengths[i]]``; the loss covers positions
    ``prompt_lengths[i] <= t < lengths[i]`` (BOS counts in the prompt). ``row_ids`` index the
    example list the set was built from. For prompt-only sets ``lengths == prompt_lengths``.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    row_ids: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])

    def take(self, positions: np.ndarray) -> TokenizedSet:
        """The sub-set at ``positions`` (indices into this set, not row ids)."""
        positions = np.asarray(positions, dtype=np.int64)
        return TokenizedSet(
            self.tokens[positions],
            self.lengths[positions],
            self.prompt_lengths[positions],
            self.row_ids[positions],
            self.pad_id,
        )

    def select_rows(self, row_ids: np.ndarray) -> TokenizedSet:
        """The sub-set holding ``row_ids`` (in that order); ids not in the set are skipped."""
        where = {int(r): i for i, r in enumerate(self.row_ids)}
        return self.take(np.array([where[int(r)] for r in row_ids if int(r) in where], np.int64))

    def attn_mask(self) -> np.ndarray:
        """int32 [n, width]: 1 on real tokens."""
        t = np.arange(self.width)
        return (t[None, :] < self.lengths[:, None]).astype(np.int32)

    def loss_mask(self) -> np.ndarray:
        """int32 [n, width]: 1 on response tokens and EOS."""
        t = np.arange(self.width)
        return (
            (t[None, :] >= self.prompt_lengths[:, None]) & (t[None, :] < self.lengths[:, None])
        ).astype(np.int32)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else EOS (LLaMA tokenizers have none; masks hide padding)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


_SI, _SC = "\x01", "\x02"  # sentinels that locate the instruction and context in a prompt


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A row's text and the character spans of its parts (None: the template rewrote them)."""

    text: str
    prompt_end: int
    instruction: tuple[int, int] | None
    context: tuple[int, int] | None


def _layout(
    ex: Example, template: str, tokenizer: Any, *, context: bool, response: bool
) -> _Layout:
    """Render the row and find where instruction and context sit, via sentinel substitution."""
    ctx = ex.context if context else ""
    prompt = render_prompt(ex.instruction, ctx, template, tokenizer)
    text = prompt + (ex.response if response else "")
    skeleton = render_prompt(_SI, _SC if ctx else "", template, tokenizer)
    if skeleton.count(_SI) != 1 or skeleton.count(_SC) != (1 if ctx else 0):
        return _Layout(text, len(prompt), None, None)
    spans: dict[str, tuple[int, int]] = {}
    shift = 0
    for pos, mark in sorted((skeleton.index(m), m) for m in (_SI, _SC) if m in skeleton):
        value = ex.instruction if mark == _SI else ctx
        spans[mark] = (pos + shift, pos + shift + len(value))
        shift += len(value) - 1
    if skeleton.replace(_SI, ex.instruction).replace(_SC, ctx) != prompt:
        return _Layout(text, len(prompt), None, None)
    return _Layout(text, len(prompt), spans[_SI], spans.get(_SC))


@dataclasses.dataclass(frozen=True)
class _Encoded:
    """One row's joint encoding with per-token segment masks (prompt ids are a prefix)."""

    ids: np.ndarray
    response: np.ndarray  # tokens holding any response character (a suffix)
    instruction: np.ndarray
    context: np.ndarray


def _encode(tokenizer: Any, layouts: list[_Layout]) -> list[_Encoded]:
    # verbose=False: no "sequence length is longer than the specified maximum" warning; rows
    # are fitted to max_seq_len (or dropped and counted) by tokenize_examples itself.
    enc = tokenizer(
        [lay.text for lay in layouts],
        add_special_tokens=False,
        return_offsets_mapping=True,
        verbose=False,
    )
    out = []
    for lay, ids, offsets in zip(layouts, enc["input_ids"], enc["offset_mapping"], strict=True):
        off = np.asarray(offsets, np.int64).reshape(-1, 2)
        start, end = off[:, 0], off[:, 1]
        response = end > lay.prompt_end

        def inside(span: tuple[int, int] | None, start=start, response=response) -> np.ndarray:
            if span is None:
                return np.zeros(len(start), bool)
            return (start >= span[0]) & (start < span[1]) & ~response

        out.append(
            _Encoded(
                np.asarray(ids, np.int32), response, inside(lay.instruction), inside(lay.context)
            )
        )
    return out


def _drop_last(mask: np.ndarray, n: int) -> np.ndarray:
    """A keep-mask that removes the last ``n`` tokens flagged in ``mask``."""
    keep = np.ones(len(mask), bool)
    if n > 0:
        keep[np.flatnonzero(mask)[-n:]] = False
    return keep


def _fit(
    e: _Encoded,
    recontext: Callable[[], _Encoded],
    *,
    max_len: int,
    eos: int,
    min_response: int,
    min_instruction: int,
) -> tuple[np.ndarray, int, bool] | None:
    """(ids, prompt length, add EOS) for a row, shortened as the module docstring says; or None."""

    def total(x: _Encoded) -> int:
        return 1 + len(x.ids) + eos

    if total(e) <= max_len:
        return e.ids, int((~e.response).sum()), bool(eos)
    excess = total(e) - max_len
    n_ctx = int(e.context.sum())
    if n_ctx > excess:  # 1. cut the context from its end
        keep = _drop_last(e.context, excess)
        return e.ids[keep], int((~e.response & keep).sum()), bool(eos)
    if n_ctx:  # the whole context goes: re-render with the no-context prompt
        e = recontext()
        if total(e) <= max_len:
            return e.ids, int((~e.response).sum()), bool(eos)
    n_prompt, n_resp = int((~e.response).sum()), int(e.response.sum())
    floor = n_resp + eos if n_resp < min_response else min_response
    if 1 + n_prompt + floor <= max_len:  # 2. cut the response at its end (then no EOS)
        return e.ids[: max_len - 1], n_prompt, False
    need = 1 + n_prompt + floor - max_len  # 3. cut the instruction, keeping a minimum
    if int(e.instruction.sum()) - need < min_instruction:
        return None
    keep = _drop_last(e.instruction, need)
    ids, n_prompt = e.ids[keep], n_prompt - need
    if 1 + len(ids) + eos <= max_len:
        return ids, n_prompt, bool(eos)
    return ids[: max_len - 1], n_prompt, False


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_seq_len: int,
    template: str = "alpaca",
    with_response: bool = True,
    min_response_tokens: int = 16,
    min_instruction_tokens: int = 16,
    rows: Sequence[int] | None = None,
    batch_size: int = 1024,
) -> tuple[TokenizedSet, dict[str, int]]:
    """Tokenise ``examples[rows]`` (all by default) into a TokenizedSet of width ``max_seq_len``.

    ``with_response=False`` gives prompts only (for generation). Returns the set and drop counts
    (``{"too_long": n}`` when rows could not be fitted; see the module docstring).
    """
    check_template(template, tokenizer)
    if max_seq_len < 2:
        raise DataError(f"data.max_seq_len={max_seq_len}: must be at least 2")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise DataError("tokenizer: needs bos_token_id and eos_token_id")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("tokenizer: needs a fast (tokenizers-backed) tokenizer for offsets")
    rows = list(range(len(examples)) if rows is None else rows)
    pad = pad_token_id(tokenizer)
    tokens = np.full((len(rows), max_seq_len), pad, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    prompt_lengths = np.zeros(len(rows), np.int32)
    kept = np.zeros(len(rows), bool)
    fit = {
        "max_len": max_seq_len,
        "eos": int(with_response),
        "min_response": min_response_tokens,
        "min_instruction": min_instruction_tokens,
    }

    def layout(ex: Example, context: bool = True) -> _Layout:
        return _layout(ex, template, tokenizer, context=context, response=with_response)

    for start in range(0, len(rows), batch_size):
        exs = [examples[i] for i in rows[start : start + batch_size]]
        for j, (ex, e) in enumerate(
            zip(exs, _encode(tokenizer, [layout(x) for x in exs]), strict=True)
        ):
            fitted = _fit(e, lambda ex=ex: _encode(tokenizer, [layout(ex, False)])[0], **fit)
            if fitted is None:
                continue
            ids, n_prompt, add_eos = fitted
            seq = [bos, *ids.tolist(), *([eos] if add_eos else [])]
            i = start + j
            tokens[i, : len(seq)] = seq
            lengths[i] = len(seq)
            prompt_lengths[i] = 1 + n_prompt
            kept[i] = True
    dropped = int((~kept).sum())
    out = TokenizedSet(
        tokens[kept], lengths[kept], prompt_lengths[kept], np.asarray(rows, np.int64)[kept], pad
    )
    return out, ({"too_long": dropped} if dropped else {})
