"""The client-training toolbox every algorithm uses: what a client trains with
(``ClientTraining``), its loss, its optimizer routed by placement label, and the scan of client
steps.

An algorithm's ``client_update`` is typically::

    loss_fn = make_loss_fn(training)                      # once, in the builder
    tx = make_optimizer(training, labels, phase_steps)    # labels: shared / personal / frozen
    opt_state = opt_state_or_init(tx, params, stored_opt_state)
    params, opt_state, metrics = local_train(loss_fn, base, params, tx, opt_state, batches, key,
                                             labels)

Parameters are routed with ``optax.partition`` so a ``frozen`` leaf gets a zero update
(``optax.set_to_zero``); ``optax.masked`` alone would pass its raw gradient through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.adapters.base import AdapterConfig
from fedlora_jax.model.config import LlamaConfig, ModelSettings
from fedlora_jax.settings import Section, setting

PyTree = Any
Array = jax.Array
# (base, adapters, batch, dropout key) -> (loss, aux); aux["tokens"] counts the loss tokens.
LossFn = Callable[[PyTree, PyTree, Mapping[str, Array], Array], tuple[Array, dict[str, Array]]]

LABELS = ("shared", "personal", "frozen")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZER_STATES = ("fresh", "persistent")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ClientTraining:
    """What every algorithm needs to train a client; algorithm-specific knobs are its Options."""

    model: LlamaConfig
    adapter: AdapterConfig
    local_steps: int = 10  # client steps per round
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | linear (decay to 0 over the phase's steps) | cosine
    warmup_steps: int = 0
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    optimizer_state: str = "fresh"  # fresh (new AdamW each round) | persistent (kept per client)
    compute_dtype: str = "float32"  # float32 | bfloat16
    remat: bool | str = False  # False | True (= "layer") | "dots_saveable": model.llama._remat


@dataclasses.dataclass(frozen=True)
class OptimSettings(Section):
    """The ``optim`` section of a run config: every client's optimizer (AdamW)."""

    section = "optim"
    lr: float = setting(3e-4, "peak learning rate of the client optimizer", low=0, inclusive=False)
    weight_decay: float = setting(0.0, "AdamW weight decay", low=0)
    schedule: str = setting(
        "constant", "learning-rate schedule over a phase's client steps", choices=SCHEDULES
    )
    warmup: int = setting(0, "linear warmup steps", low=0)
    grad_clip: float = setting(1.0, "global-norm gradient clip; 0 disables", low=0)
    optimizer_state: str = setting(
        "fresh",
        "fresh = a new AdamW every round; persistent = kept per client",
        choices=OPTIMIZER_STATES,
    )

    def client_training(
        self, model: LlamaConfig, adapter: AdapterConfig, local_steps: int, settings: ModelSettings
    ) -> ClientTraining:
        """What every algorithm trains a client with (model dtypes and remat from ``settings``)."""
        return ClientTraining(
            model=model, adapter=adapter, local_steps=local_steps, lr=self.lr,
            weight_decay=self.weight_decay, schedule=self.schedule, warmup_steps=self.warmup,
            grad_clip=self.grad_clip, optimizer_state=self.optimizer_state,
            compute_dtype=settings.compute_dtype, remat=settings.remat_arg(),
        )  # fmt: skip


def validate_training(training: ClientTraining) -> None:
    """Reject bad ClientTraining values with the key name and the allowed values."""

    def allowed(key: str, value: Any, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ValueError(
                f"training.{key}={value!r} is not allowed; allowed: {', '.join(options)}"
            )

    allowed("schedule", training.schedule, SCHEDULES)
    allowed("optimizer_state", training.optimizer_state, OPTIMIZER_STATES)
    allowed("compute_dtype", training.compute_dtype, COMPUTE_DTYPES)
    if training.local_steps < 1:
        raise ValueError(f"training.local_steps={training.local_steps} must be >= 1")
    if training.lr <= 0:
        raise ValueError(f"training.lr={training.lr} must be > 0")
    if training.warmup_steps < 0 or training.grad_clip < 0 or training.weight_decay < 0:
        raise ValueError("training.warmup_steps, grad_clip and weight_decay must be >= 0")


def make_loss_fn(training: ClientTraining) -> LossFn:
    """``loss(base, adapters, batch, key) -> (mean response-token NLL, metrics)``.

    The key drives adapter dropout only when ``training.adapter.dropout > 0``. A batch without a
    single loss token gives loss 0 (not NaN) so such a step is a no-op rather than a poison pill.
    """
    from fedlora_jax.federated.distributed import shard_batch_rows
    from fedlora_jax.model.llama import hidden
    from fedlora_jax.model.loss import lm_loss_from_hidden

    validate_training(training)
    dtype = jnp.dtype(training.compute_dtype)
    use_dropout = training.adapter.dropout > 0

    def loss_fn(
        base: PyTree, adapters: PyTree, batch: Mapping[str, Array], key: Array
    ) -> tuple[Array, dict[str, Array]]:
        h = hidden(
            base,
            adapters,
            batch["tokens"],
            batch["attn_mask"],
            cfg=training.model,
            adapter_cfg=training.adapter,
            dropout_key=key if use_dropout else None,
            compute_dtype=dtype,
            remat=training.remat,
        )
        h = shard_batch_rows(h)  # mesh backend: keep the batch split over fsdp (identity off it)
        nll, n_tokens = lm_loss_from_hidden(
            base, h, batch["tokens"], batch["loss_mask"], cfg=training.model
        )
        loss = nll / jnp.maximum(n_tokens, 1)
        return loss, {"loss": loss, "tokens": n_tokens}

    return loss_fn


def make_schedule(training: ClientTraining, steps: int) -> optax.Schedule:
    """Learning rate over one phase of ``steps`` local steps: linear warmup, then the schedule.

    With a persistent optimizer state the step counter keeps running across rounds; the schedule
    then restarts every round (counter mod steps) while Adam's moments carry over.
    """
    validate_training(training)
    if steps < 1:
        raise ValueError(f"a phase needs >= 1 local step, got {steps}")
    warmup = min(training.warmup_steps, steps - 1)
    decay_steps = max(steps - warmup, 1)
    lr = training.lr
    main = {
        "constant": lambda: optax.constant_schedule(lr),
        "linear": lambda: optax.linear_schedule(lr, 0.0, decay_steps),
        "cosine": lambda: optax.cosine_decay_schedule(lr, decay_steps),
    }[training.schedule]()
    sched = (
        optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
        if warmup > 0
        else main
    )
    if training.optimizer_state == "persistent":
        return lambda count: sched(count % steps)
    return sched


def make_adamw(training: ClientTraining, steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (of this parameter group) then AdamW on the phase's schedule."""
    parts = [optax.clip_by_global_norm(training.grad_clip)] if training.grad_clip > 0 else []
    parts.append(optax.adamw(make_schedule(training, steps), weight_decay=training.weight_decay))
    return optax.chain(*parts)


def make_optimizer(
    training: ClientTraining,
    labels: PyTree | Callable[[PyTree], PyTree],
    steps: int,
    *,
    personal: ClientTraining | None = None,
    personal_steps: int | None = None,
) -> optax.GradientTransformation:
    """Route each parameter by its label: ``shared`` → AdamW(training), ``personal`` →
    AdamW(personal or training), ``frozen`` → zero update.

    ``labels`` is a pytree of label strings matching the parameters, or a function params →
    labels. Clipping is per group, so frozen leaves never count in the clip norm.
    """
    transforms = {
        "shared": make_adamw(training, steps),
        "personal": make_adamw(personal or training, personal_steps or steps),
        "frozen": optax.set_to_zero(),
    }

    def checked(params: PyTree) -> PyTree:
        tree = labels(params) if callable(labels) else labels
        bad = sorted({lab for lab in jax.tree.leaves(tree) if lab not in LABELS})
        if bad:
            raise ValueError(
                f"parameter labels {bad} are not allowed; allowed: {', '.join(LABELS)}"
            )
        return tree

    return optax.partition(transforms, checked)


def opt_state_or_init(
    tx: optax.GradientTransformation, params: PyTree, stored: PyTree | None
) -> PyTree:
    """The client's persistent optimizer state if it has one, else a fresh ``tx.init``."""
    return tx.init(params) if stored is None else stored


def trainable_norm(grads: PyTree, labels: PyTree | None) -> Array:
    """Global norm of the gradients of non-frozen leaves (all leaves when labels is None)."""
    if labels is None:
        return optax.tree.norm(grads)
    kept = jax.tree.map(
        lambda g, lab: g if lab != "frozen" else jnp.zeros((), g.dtype), grads, labels
    )
    return optax.tree.norm(kept)


def local_train(
    loss_fn: LossFn,
    base: PyTree,
    params: PyTree,
    tx: optax.GradientTransformation,
    opt_state: PyTree,
    batches: Mapping[str, Array],
    key: Array,
    labels: PyTree | Callable[[PyTree], PyTree] | None = None,
    grad_correction: Callable[[PyTree], PyTree] | None = None,
) -> tuple[PyTree, PyTree, dict[str, Array]]:
    """Run ``steps`` optimizer steps as one ``lax.scan`` (batches leaves are [steps, batch, seq]).

    ``grad_correction`` maps each step's gradients before the optimizer (SCAFFOLD's
    ``g − c_i + c``). Metrics: mean / first / last loss over the steps, the mean trainable
    gradient norm (before clipping and correction) and ``tokens``, the loss tokens trained on (the
    loss function's aux count, summed over the steps). Step s uses dropout key ``fold_in(key, s)``.
    """
    label_tree = labels(params) if callable(labels) else labels
    steps = jax.tree.leaves(batches)[0].shape[0]
    grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

    def step(carry: tuple[PyTree, PyTree], xs: tuple) -> tuple[tuple[PyTree, PyTree], tuple]:
        p, s = carry
        batch, i = xs
        (loss, aux), grads = grad_fn(base, p, batch, jax.random.fold_in(key, i))
        used = grads if grad_correction is None else grad_correction(grads)
        updates, s = tx.update(used, s, p)
        stats = (loss, trainable_norm(grads, label_tree), aux["tokens"])
        return (optax.apply_updates(p, updates), s), stats

    (params, opt_state), (losses, norms, tokens) = jax.lax.scan(
        step, (params, opt_state), (dict(batches), jnp.arange(steps))
    )
    metrics = {
        "loss": jnp.mean(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "grad_norm": jnp.mean(norms),
        "tokens": jnp.sum(tokens).astype(jnp.float32),
    }
    return params, opt_state, metrics
