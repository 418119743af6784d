"""Evaluate global and personal adapters: batched greedy generation + response-token loss.

Every generation batch has the same shape (the last one is padded with copies of a real example
whose results are dropped; prompts are left-padded to the longest in the whole test set, rounded
up to a multiple of ``LENGTH_BUCKET``), and the jitted functions are cached per static
configuration (``generate`` jits with the configs static; the loss function is cached here). So
one ``evaluate`` call compiles each function once for all clients, and later calls on the same
test sets (every round) compile nothing.

Both sections run as K lanes of one vmapped program (K = clients): personal lane i is client i's
split under its adapter, global deals the union over the lanes under copies of the global adapter.

The loss packs: each lane's examples go first fit, longest first (``data.batches.first_fit``),
into rows as long as the longest test sequence (bucketed), with segment ids, so attention stays
inside an example and positions restart per example (``llama.hidden``). Every lane gets the same
number of rows (empty rows fill the short lanes; at most ``batch_size`` rows per call), the
program returns per-token NLL [K, rows, T-1], and the host sums each example's slots: the
bookkeeping of which example sits where is the host's anyway, the array is small (K x rows x T
floats), and the count of loss tokens is an exact integer from the host's mask. Unpacked rows
(``packing=False``) hold one example each and give the same numbers to float tolerance.
An adapter kind with a ``condition`` (kind ``dual``: FedDPA's instance-wise weight) has its
adapters set per example from each batch's prompts, in one vmapped program, before that batch's
generation and loss; its loss rows stay unpacked (one example per row, in the generation batch's
order), since a packed row would need several examples' adapters at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.adapters.base import AdapterConfig, get_kind
from fedlora_jax.data.batches import fill_rows, first_fit
from fedlora_jax.eval.metrics import best_match
from fedlora_jax.eval.report import ExampleScore, build_report
from fedlora_jax.host_memory import compiles, release_free_heap
from fedlora_jax.model import llama, loss
from fedlora_jax.model.config import LlamaConfig
from fedlora_jax.model.generate import generate_stacked, left_pad
from fedlora_jax.settings import Section, setting

PyTree = Any
LENGTH_BUCKET = 16  # pad lengths to a multiple of this, so similar test sets share compilations


class Decoder(Protocol):
    """The tokenizer side the harness needs (a HF tokenizer satisfies it)."""

    def decode(self, ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One test example: what generation, scoring and the loss need."""

    prompt_ids: tuple[int, ...]  # the prompt fed to greedy generation (BOS included if used)
    references: tuple[str, ...]  # acceptable responses; a prediction scores its best match
    tokens: tuple[int, ...]  # prompt + response (+ EOS) for the response-token loss
    loss_mask: tuple[int, ...]  # 1 on response tokens (EOS included), len == len(tokens)
    category: str = "all"

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError(
                f"EvalExample: tokens ({len(self.tokens)}) and loss_mask ({len(self.loss_mask)}) "
                "differ in length"
            )
        if not self.prompt_ids:
            raise ValueError("EvalExample: prompt_ids is empty")
        if not self.references:
            raise ValueError("EvalExample: references is empty")


_FIELDS = ("prompt_ids", "references", "tokens", "loss_mask")


class TokenizedRows(Protocol):
    """The fields of ``fedlora_jax.data.tokenize.TokenizedSet`` the harness reads."""

    tokens: np.ndarray  # [n, width], right-padded
    lengths: np.ndarray  # [n] real tokens per row
    prompt_lengths: np.ndarray  # [n] prompt tokens (BOS included); the response follows
    row_ids: np.ndarray  # [n] indices into the example list


def from_tokenized(tokenized: TokenizedRows, examples: Sequence[Any]) -> list[EvalExample]:
    """EvalExamples from the data module's tokenised test split and its rows.

    ``examples[row_id]`` must have ``category`` and ``all_references`` (``data.rows.Example``).
    The references are the full texts even when the tokenised response was truncated.
    """
    out = []
    for i, row in enumerate(tokenized.row_ids):
        n, p = int(tokenized.lengths[i]), int(tokenized.prompt_lengths[i])
        ex = examples[int(row)]
        out.append(
            EvalExample(
                prompt_ids=tuple(int(t) for t in tokenized.tokens[i, :p]),
                references=tuple(ex.all_references),
                tokens=tuple(int(t) for t in tokenized.tokens[i, :n]),
                loss_mask=(0,) * p + (1,) * (n - p),
                category=str(ex.category),
            )
        )
    return out


def as_example(item: EvalExample | Mapping[str, Any]) -> EvalExample:
    """Accept an ``EvalExample`` or a mapping with its field names (``category`` optional)."""
    if isinstance(item, EvalExample):
        return item
    missing = [k for k in _FIELDS if k not in item]
    if missing:
        raise ValueError(f"test example lacks keys {missing}; needs {list(_FIELDS)} (+ category)")
    return EvalExample(
        prompt_ids=tuple(int(t) for t in item["prompt_ids"]),
        references=tuple(str(r) for r in item["references"]),
        tokens=tuple(int(t) for t in item["tokens"]),
        loss_mask=tuple(int(t) for t in item["loss_mask"]),
        category=str(item.get("category", "all")),
    )


# ----------------------------------------------------------------------------- jitted kernels


@functools.cache
def _loss_fn(cfg: LlamaConfig, adapter_cfg: AdapterConfig | None, compute_dtype: Any):
    """(base, adapters [K, ...], tokens, segments [K, R, T]) -> per-token NLL [K, R, T-1] (slot
    t predicting slot t+1, chunked LM head): lane k's rows under adapter k, one program for
    every client."""

    def lane_token_nll(base: PyTree, adapters: PyTree, tokens, segments):
        def one(adapters: PyTree, tokens, segments):
            h = llama.hidden(
                base, adapters, tokens, segments,
                cfg=cfg, adapter_cfg=adapter_cfg, compute_dtype=compute_dtype,
            )  # fmt: skip
            return loss.token_nll_from_hidden(base, h, tokens, cfg=cfg)

        return jax.vmap(one)(adapters, tokens, segments)

    return jax.jit(lane_token_nll)


@functools.cache
def _condition_fn(cfg: LlamaConfig, adapter_cfg: AdapterConfig | None, compute_dtype: Any):
    """(base, adapters [K, ...], prompt tokens, prompt mask [K, B, P]) -> the adapters for those
    B examples of each lane, from the kind's ``condition``; None when the kind has none."""
    condition = (
        None if adapter_cfg is None else getattr(get_kind(adapter_cfg.kind), "condition", None)
    )
    if condition is None:
        return None

    def per_example(base: PyTree, adapters: PyTree, tokens, mask):
        def one(adapters: PyTree, tokens, mask):
            return condition(
                base, adapters, tokens, mask,
                cfg=cfg, adapter_cfg=adapter_cfg, compute_dtype=compute_dtype,
            )  # fmt: skip

        return jax.vmap(one)(adapters, tokens, mask)

    return jax.jit(per_example)


# ----------------------------------------------------------------------------- batching


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


@dataclasses.dataclass(frozen=True)
class _Shapes:
    batch: int  # generation rows per call
    prompt_len: int
    seq_len: int  # slots per loss row
    loss_rows: int  # loss rows per call


def _pad_rows(rows: list[EvalExample], batch: int) -> list[EvalExample]:
    """Fill a short last batch with copies of its first row (real data: no all-pad rows)."""
    return rows + [rows[0]] * (batch - len(rows))


LossRows = list[list[list[int]]]  # per lane: its loss rows, each the indices of its examples


def _packed_rows(
    groups: Sequence[Sequence[int]], examples: Sequence[EvalExample], seq_len: int
) -> LossRows:
    """Each lane's examples first fit, longest first, into rows of ``seq_len`` slots."""
    out = []
    for group in groups:
        order = sorted(group, key=lambda i: -len(examples[i].tokens))
        lengths = np.asarray([len(examples[i].tokens) for i in order])
        rows: list[list[int]] = [[] for _ in order]
        # every example fits a row alone (seq_len >= the longest), so first_fit places them all
        for i, b in zip(order, first_fit(lengths, len(order), seq_len), strict=True):
            rows[b].append(i)
        out.append([r for r in rows if r])
    return out


def _single_rows(groups: Sequence[Sequence[int]]) -> LossRows:
    """One example per row, in lane order (unpacked)."""
    return [[[i] for i in group] for group in groups]


def _rows_per_call(rows: Sequence[LossRows], batch: int) -> int:
    """At most ``batch`` rows per call, balanced over the calls the longest lane needs."""
    longest = max(len(lane) for section in rows for lane in section)
    return -(-longest // -(-longest // batch))


@dataclasses.dataclass(frozen=True)
class _LossCall:
    """One loss call's inputs [K, R, T] and where each of its examples sits."""

    tokens: np.ndarray
    segments: np.ndarray
    loss_mask: np.ndarray  # 0 on each segment's first slot (never a target)
    slots: tuple[tuple[int, int, int, int, int], ...]  # (example, lane, row, first slot, length)


def _loss_calls(
    rows: LossRows, examples: Sequence[EvalExample], shapes: _Shapes, pad_id: int
) -> list[_LossCall]:
    """The lanes' rows cut into calls of ``shapes.loss_rows`` rows, every lane padded with empty
    rows to the same number of calls (one compiled shape; empty rows hold no example)."""
    per_call = shapes.loss_rows
    depth = max(-(-len(lane) // per_call) for lane in rows)
    calls = []
    for d in range(depth):
        arrays, slots = [], []
        for k, lane in enumerate(rows):
            chunk = lane[d * per_call : (d + 1) * per_call]
            members = [(i, r) for r, row in enumerate(chunk) for i in row]
            tokens, segments, mask, starts = fill_rows(
                [examples[i].tokens for i, _ in members],
                [examples[i].loss_mask for i, _ in members],
                np.asarray([r for _, r in members], np.int64),
                rows=per_call, seq_len=shapes.seq_len, pad_id=pad_id,
            )  # fmt: skip
            arrays.append((tokens, segments, mask))
            slots += [
                (i, k, r, int(at), len(examples[i].tokens))
                for (i, r), at in zip(members, starts, strict=True)
            ]
        tokens, segments, mask = (np.stack(x) for x in zip(*arrays, strict=True))
        calls.append(_LossCall(tokens, segments, mask, tuple(slots)))
    return calls


def _example_losses(call: _LossCall, nll: np.ndarray) -> dict[int, tuple[float, int]]:
    """Each example's (sum NLL, loss tokens) from its call's per-token NLL [K, R, T-1]: slot t
    predicts slot t+1, counted where the loss mask of t+1 is 1, over the example's own slots."""
    weight = call.loss_mask[..., 1:]
    out = {}
    for i, k, r, at, n in call.slots:
        w = weight[k, r, at : at + n - 1]
        out[i] = (float(np.dot(nll[k, r, at : at + n - 1].astype(np.float64), w)), int(w.sum()))
    return out


def strip_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens before the first EOS (the EOS and anything after it are dropped)."""
    out = []
    for t in ids:
        if t in eos_ids:
            break
        out.append(int(t))
    return out


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class _Setup:
    """Everything that stays fixed across the adapters scored in one ``evaluate`` call."""

    cfg: LlamaConfig
    adapter_cfg: AdapterConfig | None
    tokenizer: Decoder
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    compute_dtype: Any
    shapes: _Shapes


Lanes = list[list[list[int] | None]]


def _lanes(groups: Sequence[Sequence[int]], batch: int) -> Lanes:
    """Per lane (adapter k), its examples' indices cut into batches; every lane padded with
    ``None`` batches to the same depth (computed on a filler example, results dropped)."""
    chunks = [[list(g[i : i + batch]) for i in range(0, len(g), batch)] for g in groups]
    depth = max(len(c) for c in chunks)
    return [c + [None] * (depth - len(c)) for c in chunks]


def _launch(
    base: PyTree,
    stacked: PyTree,
    examples: Sequence[EvalExample],
    lanes: Lanes,
    loss_rows: LossRows,
    setup: _Setup,
) -> tuple[list[tuple], list[tuple]]:
    """Dispatch generation for every batch depth and the loss for every call, all K lanes
    (adapters) in one call each; returns device arrays without waiting, so host scoring overlaps
    the device work. A kind with ``condition`` scores its loss call d (the unpacked rows of
    generation batch d) under the adapters set for batch d."""
    nll_fn = _loss_fn(setup.cfg, setup.adapter_cfg, setup.compute_dtype)
    condition = _condition_fn(setup.cfg, setup.adapter_cfg, setup.compute_dtype)
    shapes = setup.shapes
    calls = _loss_calls(loss_rows, examples, shapes, setup.pad_id)
    generations, losses = [], []
    for depth in range(len(lanes[0])):
        rows = [
            _pad_rows([examples[i] for i in lane[depth] or [0]], shapes.batch) for lane in lanes
        ]
        # multiple=prompt_len pads every batch to the same width (prompt_len >= every prompt).
        prompts = [
            left_pad([ex.prompt_ids for ex in r], setup.pad_id, shapes.prompt_len) for r in rows
        ]
        prompt_tokens, prompt_mask = (np.stack(x) for x in zip(*prompts, strict=True))
        adapters = stacked
        if condition is not None:  # adapters set per example (FedDPA's instance-wise weight)
            adapters = condition(base, stacked, prompt_tokens, prompt_mask)
        generated = generate_stacked(
            base, adapters, prompt_tokens, prompt_mask,
            cfg=setup.cfg, adapter_cfg=setup.adapter_cfg, max_new_tokens=setup.max_new_tokens,
            eos_ids=setup.eos_ids, compute_dtype=setup.compute_dtype, pad_id=setup.pad_id,
        )  # fmt: skip
        generations.append(generated)
        if condition is not None:
            call = calls[depth]
            losses.append((call, nll_fn(base, adapters, call.tokens, call.segments)))
    if condition is None:
        losses = [(c, nll_fn(base, stacked, c.tokens, c.segments)) for c in calls]
    return generations, losses


def _collect(
    pending: tuple[list[tuple], list[tuple]],
    examples: Sequence[EvalExample],
    owners: Sequence[int],
    lanes: Lanes,
    setup: _Setup,
) -> tuple[list[ExampleScore], list[str]]:
    """Decode and score on the host, in ``examples`` order (ROUGE runs while later batches and
    the loss are still on the device)."""
    generations, losses = pending
    scored: dict[int, tuple[str, float, float]] = {}
    for depth, (new_tokens, lengths) in enumerate(generations):
        new_tokens, lengths = np.asarray(new_tokens), np.asarray(lengths)
        for k, lane in enumerate(lanes):
            for b, i in enumerate(lane[depth] or ()):  # None: a padding batch
                ids = strip_at_eos(new_tokens[k, b, : int(lengths[k, b])].tolist(), setup.eos_ids)
                text = setup.tokenizer.decode(ids).strip()
                scored[i] = (text, *best_match(text, examples[i].references))
    nll: dict[int, tuple[float, int]] = {}
    for call, token_nll in losses:
        nll.update(_example_losses(call, np.asarray(token_nll)))
    scores = [
        ExampleScore(
            client_id=int(owners[i]),
            category=ex.category,
            rouge_l=scored[i][1],
            exact_match=scored[i][2],
            sum_nll=nll[i][0],
            n_tokens=nll[i][1],
        )
        for i, ex in enumerate(examples)
    ]
    return scores, [scored[i][0] for i in range(len(examples))]


def _replicate(adapters: PyTree, k: int) -> PyTree:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), adapters)


def _records(
    scores: list[ExampleScore], predictions: list[str], examples: Sequence[EvalExample]
) -> list[dict[str, Any]]:
    return [
        {
            "client_id": sc.client_id,
            "category": sc.category,
            "prediction": pred,
            "references": list(ex.references),
            "rouge_l": sc.rouge_l,
        }
        for sc, pred, ex in zip(scores, predictions, examples, strict=True)
    ]


def _leading_axis(tree: PyTree) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"personal_adapters: leaves disagree on the client axis, sizes {sizes}")
    return sizes.pop()


def evaluate(
    base: PyTree,
    global_adapters: PyTree | None,
    personal_adapters: PyTree | None,
    clients_test: Sequence[Sequence[EvalExample | Mapping[str, Any]]],
    *,
    cfg: LlamaConfig,
    adapter_cfg: AdapterConfig | None,
    tokenizer: Decoder,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    compute_dtype: Any = jnp.float32,
    client_weights: Mapping[int, float] | None = None,
    return_predictions: bool = False,
    global_label: str = "global",
    packing: bool = True,
) -> dict[str, Any] | tuple[dict[str, Any], dict[str, list[dict[str, Any]] | None]]:
    """The global/personal report (see ``report.build_report``) for one round's models.

    ``clients_test[i]`` is client i's test split; ``personal_adapters`` leaves carry a leading
    client axis of that length. Global = ``global_adapters`` on the union of the splits; personal =
    personal adapter i on split i, or, when ``personal_adapters`` is None (the algorithm's
    ``Models.personal_is_global``: FedIT, FFA-LoRA, Centralised), the global adapter on each
    split, recorded as ``personal.adapter = "global"``; arrays are never compared. Pass ``{}`` as
    ``global_adapters`` to evaluate the base model.
    ``eos_ids`` defaults to ``cfg.eos_ids``; ``pad_id`` to ``cfg.pad_token_id``, else the first
    EOS id (pads are masked out either way). With ``return_predictions`` also returns the decoded
    generations per section. The personalisation gain needs no extra pass: the global section's
    rows of client i are exactly client i's split. ``global_label``: ``Models.global_label``.
    ``packing=False`` scores the loss one example per row (the same numbers to float tolerance,
    more slots; a kind with ``condition`` always does, see the module docstring).
    """
    if global_adapters is None and personal_adapters is None:
        raise ValueError("evaluate: both global_adapters and personal_adapters are None")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"evaluate: batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1"
        )
    splits = [[as_example(e) for e in split] for split in clients_test]
    empty = [i for i, s in enumerate(splits) if not s]
    if not splits or empty:
        raise ValueError(f"evaluate: clients {empty or 'all'} have no test examples")
    if personal_adapters is not None and _leading_axis(personal_adapters) != len(splits):
        raise ValueError(
            f"evaluate: personal_adapters has {_leading_axis(personal_adapters)} clients on its "
            f"leading axis but clients_test has {len(splits)}"
        )
    eos = tuple(cfg.eos_ids if eos_ids is None else eos_ids)
    compute_dtype = jnp.dtype(compute_dtype)  # one cache key for jnp.float32 / "float32" / ...
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    every = [ex for s in splits for ex in s]
    owners = [i for i, s in enumerate(splits) for _ in s]
    seq_len = _bucket(max(len(ex.tokens) for ex in every))

    # Both sections run as K lanes (K = clients) of one program: personal lane i = client i's
    # split under its adapter; global = the union dealt over K lanes under K copies of the global
    # adapter. Both sections' loss calls share one shape (rows per call from the longer one).
    k = len(splits)
    sections = {}  # name -> (adapters [K, ...], each lane's example indices)
    if global_adapters is not None:
        dealt = [list(range(len(every)))[i::k] for i in range(k)]
        sections["global"] = (_replicate(global_adapters, k), dealt)
    if personal_adapters is not None:
        own = [[j for j, o in enumerate(owners) if o == i] for i in range(k)]
        sections["personal"] = (personal_adapters, own)
    pack = packing and _condition_fn(cfg, adapter_cfg, compute_dtype) is None
    loss_rows = {
        name: _packed_rows(g, every, seq_len) if pack else _single_rows(g)
        for name, (_, g) in sections.items()
    }
    setup = _Setup(
        cfg=cfg,
        adapter_cfg=adapter_cfg,
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=pad_id,
        compute_dtype=compute_dtype,
        shapes=_Shapes(
            batch=batch_size,
            prompt_len=_bucket(max(len(ex.prompt_ids) for ex in every)),
            seq_len=seq_len,
            # unpacked: generation's batches, so a conditioned kind's loss call d is batch d
            loss_rows=_rows_per_call(list(loss_rows.values()), batch_size) if pack else batch_size,
        ),
    )
    # Everything is dispatched before any result is read, so the host decodes and scores one
    # section while the device computes the next.
    jobs = {}
    for name, (stacked, g) in sections.items():
        lanes = _lanes(g, batch_size)
        jobs[name] = (lanes, _launch(base, stacked, every, lanes, loss_rows[name], setup))
    done = {name: _collect(p, every, owners, lanes, setup) for name, (lanes, p) in jobs.items()}
    programs = (cfg, adapter_cfg, max_new_tokens, eos, pad_id, compute_dtype, setup.shapes, k)
    if compiles(("evaluate", *programs)):  # the compiler's freed heap (host_memory)
        release_free_heap()
    global_scores, global_preds = done.get("global", (None, None))
    if personal_adapters is None:
        personal_scores, personal_preds, personal_adapter = global_scores, global_preds, "global"
    else:
        (personal_scores, personal_preds), personal_adapter = done["personal"], "personal"
    report = build_report(
        global_scores,
        personal_scores,
        personal_adapter=personal_adapter,
        client_weights=client_weights,
        global_label=global_label,
    )
    if not return_predictions:
        return report
    predictions = {
        "global": None if global_scores is None else _records(global_scores, global_preds, every),
        "personal": _records(personal_scores, personal_preds, every),
    }
    return report, predictions


@dataclasses.dataclass(frozen=True)
class EvalSettings(Section):
    """The ``eval`` section of a run config: when and how much ``evaluate`` scores."""

    section = "eval"
    every: int = setting(0, "evaluate every this many rounds; 0 = only after the last", low=0)
    max_new_tokens: int = setting(32, "greedy generation length (stops at EOS)", low=1)
    batch_size: int = setting(
        8, "test examples per generation batch; packed loss rows per call (at most)", low=1
    )
    max_examples_per_client: int = setting(
        8, "the first this many of each client's test rows; 0 = the whole split", low=0
    )
