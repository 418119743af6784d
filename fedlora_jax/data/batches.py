"""Fixed-shape batches from tokenised rows: training rounds, and evaluation chunks.

Training sampling is an epoch stream per client: the client's rows in a seeded permutation per
epoch (epoch e of client c uses the generator of (seed, c, e)), concatenated; round r takes the
next ``steps * batch_size`` positions. So each row is seen once per epoch, a client with fewer
rows than a round needs repeats rows (its round spans several epochs), and a round's batches
depend only on (seed, round, client_id).

Packing (``packed_round_batches``, the runner's default) keeps the stream and the shape
[steps, batch_size, seq_len] but fills each row with several examples: the round's rows are
bins, the stream's next examples go to the first bin with room (first fit, in stream order) until
one fits in no bin; that example opens the next round. ``attn_mask`` then holds segment ids
(0 = padding, 1..S = the examples of the row, in order), from which the model builds the
block-diagonal causal mask and per-segment positions; ``loss_mask`` is each example's own
response span. A step's loss stays the mean NLL over the response tokens in the step's rows, so
a packed row contributes exactly the sum of its examples' summed NLLs (tested); a step simply
holds more examples than ``batch_size``. How many depends on the lengths, so round r starts
where round r-1 stopped: still a pure function of (seed, round, client_id).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from fedlora_jax.data.rows import DataError
from fedlora_jax.data.tokenize import TokenizedSet


def _check_fits(ts: TokenizedSet, seq_len: int) -> None:
    if len(ts) and int(ts.lengths.max()) > seq_len:
        raise DataError(
            f"seq_len={seq_len}: shorter than the longest row "
            f"({int(ts.lengths.max())} tokens); use data.max_seq_len <= seq_len"
        )


def _fit_width(ts: TokenizedSet, seq_len: int) -> TokenizedSet:
    """The set at width ``seq_len`` (padding more, or cutting columns that are padding only)."""
    _check_fits(ts, seq_len)
    if seq_len <= ts.width:
        tokens = ts.tokens[:, :seq_len]
    else:
        tokens = np.full((len(ts), seq_len), ts.pad_id, np.int32)
        tokens[:, : ts.width] = ts.tokens
    return dataclasses.replace(ts, tokens=tokens)


def epoch_stream(n: int, start: int, count: int, *, seed: int, client_id: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of the client's epoch-permutation stream over n rows."""
    if n < 1:
        raise DataError(f"client {client_id}: no training rows to sample from")
    first, last = start // n, (start + count - 1) // n
    stream = np.concatenate(
        [
            np.random.default_rng(np.random.SeedSequence([seed, 2, client_id, e])).permutation(n)
            for e in range(first, last + 1)
        ]
    )
    return stream[start - first * n : start - first * n + count]


def client_round_batches(
    tokenized_client: TokenizedSet,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    round: int,
    client_id: int,
) -> dict[str, np.ndarray]:
    """One round of a client's training input: int32 ``tokens, loss_mask, attn_mask``
    of shape [steps, batch_size, seq_len], right-padded."""
    need = steps * batch_size
    pos = epoch_stream(len(tokenized_client), round * need, need, seed=seed, client_id=client_id)
    ts = _fit_width(tokenized_client.take(pos), seq_len)
    shape = (steps, batch_size, seq_len)
    return {
        "tokens": ts.tokens.reshape(shape),
        "loss_mask": ts.loss_mask().reshape(shape),
        "attn_mask": ts.attn_mask().reshape(shape),
    }


def first_fit(lengths: np.ndarray, bins: int, capacity: int) -> np.ndarray:
    """Bin of each of the leading examples that fit: example j goes to the first of ``bins``
    bins with ``capacity - used >= lengths[j]``; stops at the first example that fits nowhere.

    Returns bin indices [m] for the first m examples (m <= len(lengths))."""
    free = np.full(bins, capacity, np.int64)
    out = []
    for n in lengths:
        room = np.flatnonzero(free >= n)
        if room.size == 0:
            break
        free[room[0]] -= n
        out.append(room[0])
    return np.asarray(out, np.int64)


def fill_rows(
    tokens: Sequence[np.ndarray],
    loss_masks: Sequence[np.ndarray],
    where: np.ndarray,
    *,
    rows: int,
    seq_len: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Packed rows from examples placed by ``first_fit``: example j (``tokens[j]``, its
    ``loss_masks[j]``) goes to row ``where[j]`` after the examples placed there before it.

    Returns int32 ``tokens, segments, loss_mask`` [rows, seq_len] (segment ids 1..S per row in
    placement order, 0 = padding) and each example's first slot [m]. A segment's first token is
    never a target (nothing in its segment predicts it), so its loss mask is 0 there, as in an
    unpacked row whose first token is never predicted."""
    out_tokens = np.full((rows, seq_len), pad_id, np.int32)
    segments = np.zeros((rows, seq_len), np.int32)
    loss_mask = np.zeros((rows, seq_len), np.int32)
    used = np.zeros(rows, np.int64)
    count = np.zeros(rows, np.int32)
    starts = np.zeros(len(where), np.int64)
    for j, (ids, mask, b) in enumerate(zip(tokens, loss_masks, where, strict=True)):
        n, at = len(ids), int(used[b])
        if at + n > seq_len:
            raise DataError(f"fill_rows: row {b} overflows seq_len={seq_len} at example {j}")
        out_tokens[b, at : at + n] = ids
        count[b] += 1
        segments[b, at : at + n] = count[b]
        loss_mask[b, at + 1 : at + n] = np.asarray(mask)[1:]
        starts[j], used[b] = at, at + n
    return out_tokens, segments, loss_mask, starts


# (lengths digest, bins, seq_len, seed, client_id) -> stream start of rounds 0..len-1
_STARTS: dict[tuple, list[int]] = {}


def _packed_window(ts: TokenizedSet, bins: int, seq_len: int) -> int:
    """Most examples one round can consume (every bin full of the shortest rows)."""
    return bins * (seq_len // max(int(ts.lengths.min()), 1))


def packed_round_start(
    ts: TokenizedSet, *, bins: int, seq_len: int, seed: int, round: int, client_id: int
) -> int:
    """Stream position where ``round`` starts under packing: the examples rounds 0..round-1
    consumed (each round is a ``first_fit`` of the stream from where the last one stopped)."""
    digest = hashlib.sha1(np.ascontiguousarray(ts.lengths).tobytes()).hexdigest()
    starts = _STARTS.setdefault((digest, bins, seq_len, seed, client_id), [0])
    window = _packed_window(ts, bins, seq_len)
    while len(starts) <= round:
        pos = epoch_stream(len(ts), starts[-1], window, seed=seed, client_id=client_id)
        starts.append(starts[-1] + len(first_fit(ts.lengths[pos], bins, seq_len)))
    return starts[round]


def packed_round_batches(
    tokenized_client: TokenizedSet,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    round: int,
    client_id: int,
) -> dict[str, np.ndarray]:
    """``client_round_batches`` with several examples per row (see the module docstring):
    ``tokens, loss_mask`` and ``attn_mask`` = segment ids, int32 [steps, batch_size, seq_len]."""
    ts = tokenized_client
    _check_fits(ts, seq_len)
    if len(ts) and int(ts.prompt_lengths.min()) < 1:
        raise DataError("packing: every row needs a prompt token (BOS) to open its segment")
    bins = steps * batch_size
    start = packed_round_start(
        ts, bins=bins, seq_len=seq_len, seed=seed, round=round, client_id=client_id
    )
    pos = epoch_stream(
        len(ts), start, _packed_window(ts, bins, seq_len), seed=seed, client_id=client_id
    )
    where = first_fit(ts.lengths[pos], bins, seq_len)
    sub = ts.take(pos[: len(where)])
    loss_masks = sub.loss_mask()
    tokens, segments, loss_mask, _ = fill_rows(
        [sub.tokens[j, :n] for j, n in enumerate(sub.lengths)],
        [loss_masks[j, :n] for j, n in enumerate(sub.lengths)],
        where,
        rows=bins,
        seq_len=seq_len,
        pad_id=ts.pad_id,
    )
    shape = (steps, batch_size, seq_len)
    return {
        "tokens": tokens.reshape(shape),
        "loss_mask": loss_mask.reshape(shape),
        "attn_mask": segments.reshape(shape),
    }


def packing_efficiency(batches: dict[str, np.ndarray]) -> float:
    """Real tokens / slots of a batch dict (``attn_mask`` > 0 marks real tokens)."""
    return float(np.mean(np.asarray(batches["attn_mask"]) > 0))


def stack_clients(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-client round batches on a leading client axis: [K, steps, batch, seq]."""
    if not batches:
        raise DataError("stack_clients: no clients given")
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _chunks(ts: TokenizedSet, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions [C, chunk], valid [C, chunk]): the set in fixed chunks, the last one padded."""
    if chunk_size < 1:
        raise DataError(f"chunk_size={chunk_size}: must be at least 1")
    n_chunks = max(1, -(-len(ts) // chunk_size))
    idx = np.arange(n_chunks * chunk_size)
    valid = (idx < len(ts)).astype(np.int32)
    return np.where(valid, idx, 0).reshape(n_chunks, chunk_size), valid.reshape(n_chunks, -1)


def eval_loss_batches(ts: TokenizedSet, *, chunk_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """Full sequences for response-token loss: ``tokens, loss_mask, attn_mask`` [C, chunk, seq]
    right-padded, ``valid`` [C, chunk] (0 = padding row, repeated row 0 with masks zeroed) and
    ``row_ids`` [C, chunk] (-1 on padding rows)."""
    if len(ts) == 0:
        raise DataError("eval_loss_batches: empty set")
    pos, valid = _chunks(ts, chunk_size)
    sub = _fit_width(ts.take(pos.reshape(-1)), seq_len)
    shape = (*pos.shape, seq_len)
    v = valid.reshape(-1, 1)
    return {
        "tokens": sub.tokens.reshape(shape),
        "loss_mask": (sub.loss_mask() * v).reshape(shape),
        "attn_mask": sub.attn_mask().reshape(shape),
        "valid": valid,
        "row_ids": np.where(valid, sub.row_ids.reshape(pos.shape), -1),
    }


def eval_prompt_batches(
    ts: TokenizedSet, *, chunk_size: int, prompt_len: int | None = None
) -> dict[str, np.ndarray]:
    """Prompts (BOS + prompt, no response) LEFT-padded for batched generation.

    ``tokens, attn_mask`` [C, chunk, P] with P = ``prompt_len`` (default: the longest prompt in
    the set; pass a fixed value so every client's chunks share one compiled shape), ``valid``
    and ``row_ids`` as in ``eval_loss_batches``. References are ``examples[row_ids]``.
    """
    if len(ts) == 0:
        raise DataError("eval_prompt_batches: empty set")
    pos, valid = _chunks(ts, chunk_size)
    longest = int(ts.prompt_lengths.max())
    width = prompt_len or longest
    if width < longest:
        raise DataError(f"prompt_len={prompt_len}: shorter than the longest prompt ({longest})")
    flat = pos.reshape(-1)
    p_len = ts.prompt_lengths[flat]
    t = np.arange(width)[None, :]
    shift = (width - p_len)[:, None]  # left padding per row
    src = np.clip(t - shift, 0, ts.width - 1)
    real = t >= shift
    tokens = np.where(real, np.take_along_axis(ts.tokens[flat], src, axis=1), ts.pad_id)
    shape = (*pos.shape, width)
    return {
        "tokens": tokens.astype(np.int32).reshape(shape),
        "attn_mask": real.astype(np.int32).reshape(shape),
        "valid": valid,
        "row_ids": np.where(valid, ts.row_ids[flat].reshape(pos.shape), -1),
    }
