"""GaLore-Adam as an optax ``GradientTransformation`` (Zhao et al. 2024, arXiv 2403.03507).

Each matrix gradient G (last two axes m x n; leading axes are batched) is projected onto a rank-r
subspace taken from its own SVD, Adam runs on the small projected gradient, and the Adam direction
is projected back and multiplied by ``scale``. The side follows GaLore's ``proj_type="std"`` rule
on the array exactly as given:

* m >= n ("right"): P = Vh[:r] is r x n, the projected gradient is G @ P.T (m x r), back: U @ P;
* m <  n ("left"):  P = U[:, :r] is m x r, the projected gradient is P.T @ G (r x n), back: P @ U.

So the projector always spans the smaller side. (Our adapter leaves are ``[in, out]`` while torch
weights are ``(out, in)``; the rule picks the same smaller side, only square matrices differ: here
they project the output side.) The projectors are recomputed when ``count % update_proj_gap == 0``
(steps 0, T, 2T, ...) and the Adam moments are kept across a refresh, as in GaLore.

Bias correction and ``eps`` placement follow ``optax.adam`` (eps added after bias correction),
so at full rank with identity projectors this is ``optax.adam`` to float precision. Leaves that
are not matrices, and (with ``dense_fallback``) matrices whose smaller side is <= rank, get plain
Adam: projecting them would save nothing.

For federated second-moment synchronisation the state can be read and written from outside:
``projectors``, ``second_moment``, ``refresh_projectors`` and ``set_second_moment`` find the
``GaLoreState`` anywhere inside a chained optax state.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Array = jax.Array
Side = Literal["right", "left"]


class GaLoreState(NamedTuple):
    """count: steps taken; proj_count: the count at which the projectors were last computed
    (-1 = never); proj: None for dense-Adam leaves; nu_warm: per entry of nu, True where nu was
    seeded from outside with a positive value (an already unbiased estimate, so that entry skips
    Adam's bias correction; a zero seed carries no information and keeps it)."""

    count: Array
    proj_count: Array
    proj: PyTree
    mu: PyTree
    nu: PyTree
    nu_warm: PyTree


def projection_side(shape: tuple[int, ...], rank: int, dense_fallback: bool = True) -> Side | None:
    """GaLore's side for a leaf of this shape, or None for plain Adam."""
    if len(shape) < 2:
        return None
    m, n = shape[-2], shape[-1]
    if dense_fallback and min(m, n) <= rank:
        return None
    if rank > min(m, n):
        raise ValueError(f"galore rank={rank} exceeds the smaller side of a {m}x{n} matrix")
    return "right" if m >= n else "left"


def side_of(grad: Array) -> Side:
    """GaLore's std rule on the last two axes: right when m >= n, else left."""
    return "right" if grad.shape[-2] >= grad.shape[-1] else "left"


def _rank_of(proj: Array, side: Side) -> int:
    return proj.shape[-2] if side == "right" else proj.shape[-1]


# Why every SVD here goes through ``thin_svd``: on XLA:CPU, jaxlib 0.10's batched LAPACK kernels
# (``lapack_sgesdd_ffi`` -> ``jax::ParallelBatchMap``) split a batch whose cost is above ~2e5 FLOP
# into chunks, schedule them on XLA's intra-op Eigen thread pool and then block the calling thread
# in ``BlockingCounter::Wait`` until they finish. The calling thread is itself a worker of that
# pool (the thunk executor runs custom calls there). A FedGaLore round has independent batched
# SVDs, one per adapter leaf (q: [clients*layers, 64, 64], v: [clients*layers, 64, 32] for
# stories260K), which the executor runs concurrently. Once as many of them as the pool has threads
# (two on a 2-core machine; the pool is sized from the CPU affinity) have scheduled their chunks
# and wait, no worker is left to run a chunk: a deadlock with every thread idle in a condition
# wait (gdb: both pool threads in SingularValueDecompositionKernel -> ParallelBatchMap ->
# BlockingCounter::Wait). A batch of one matrix never leaves the calling thread (ParallelBatchMap
# runs it inline), so on CPU the SVDs are taken one matrix per LAPACK call, in a loop; a vmap of
# that loop would batch its body again, hence the custom_vmap rule that folds the mapped axis into
# the loop instead. Upstream later compiled the parallel path out of open-source builds
# (jax-ml/jax commit 859992407d, issue 36927); until we require such a jaxlib this stays.


def _svd_rows(x: Array) -> tuple[Array, Array, Array]:
    """Thin SVD of [..., m, n], one m x n matrix per LAPACK call (a sequential loop)."""
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    u, s, vh = jax.lax.map(lambda a: jnp.linalg.svd(a, full_matrices=False), x.reshape((-1, m, n)))
    return (
        u.reshape(lead + u.shape[1:]),
        s.reshape(lead + s.shape[1:]),
        vh.reshape(lead + vh.shape[1:]),
    )


@jax.custom_batching.custom_vmap
def _svd_unbatched(x: Array) -> tuple[Array, Array, Array]:
    """``_svd_rows`` that stays a loop of single-matrix SVDs under any number of vmaps."""
    return _svd_rows(x)


@_svd_unbatched.def_vmap
def _svd_unbatched_vmap(axis_size: int, in_batched: list[bool], x: Array):
    if not in_batched[0]:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    return _svd_unbatched(x), (True, True, True)


def thin_svd(x: Array) -> tuple[Array, Array, Array]:
    """``jnp.linalg.svd(x, full_matrices=False)`` for any leading axes, vmap included, without
    the XLA:CPU thread-pool deadlock described above (other platforms keep the batched call)."""
    x = x.astype(jnp.float32)
    return jax.lax.platform_dependent(
        x, cpu=_svd_unbatched, default=lambda a: tuple(jnp.linalg.svd(a, full_matrices=False))
    )


def svd_projector(grad: Array, rank: int, side: Side) -> Array:
    """Orthonormal rank-r projector from the gradient's SVD (right: r x n rows; left: m x r)."""
    u, _, vh = thin_svd(grad)
    return vh[..., :rank, :] if side == "right" else u[..., :, :rank]


def project(full: Array, proj: Array, side: Side) -> Array:
    """Full m x n -> projected (right: m x r, left: r x n)."""
    if side == "right":
        return jnp.einsum("...mn,...rn->...mr", full, proj)
    return jnp.einsum("...mr,...mn->...rn", proj, full)


def project_back(low: Array, proj: Array, side: Side) -> Array:
    """Projected -> full m x n (the transpose map of ``project``)."""
    if side == "right":
        return jnp.einsum("...mr,...rn->...mn", low, proj)
    return jnp.einsum("...mr,...rn->...mn", proj, low)


def _validate(rank: int, update_proj_gap: int, scale: float) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"galore rank must be a positive int, got {rank!r}")
    if not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"galore update_proj_gap must be a positive int, got {update_proj_gap!r}")
    if not scale > 0:
        raise ValueError(f"galore scale must be > 0, got {scale!r}")


def _new_projectors(grads: PyTree, proj: PyTree) -> PyTree:
    """Recompute every non-None projector from the matching gradient (same rank, same side)."""

    def one(g: Array, p: Array | None) -> Array | None:
        if p is None:
            return None
        side = side_of(g)
        return svd_projector(g, _rank_of(p, side), side).astype(p.dtype)

    return jax.tree.map(one, grads, proj, is_leaf=lambda x: x is None)


def scale_by_galore(
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    dense_fallback: bool = True,
) -> optax.GradientTransformation:
    """The learning-rate-free GaLore-Adam direction (like ``optax.scale_by_adam``)."""
    _validate(rank, update_proj_gap, scale)

    def init(params: PyTree) -> GaLoreState:
        def proj0(p: Array) -> Array | None:
            side = projection_side(p.shape, rank, dense_fallback)
            if side is None:
                return None
            m, n = p.shape[-2], p.shape[-1]
            shape = (rank, n) if side == "right" else (m, rank)
            return jnp.zeros(p.shape[:-2] + shape, jnp.float32)

        proj = jax.tree.map(proj0, params)

        def moment0(p: Array, pr: Array | None) -> Array:
            if pr is None:
                return jnp.zeros(p.shape, jnp.float32)
            return jnp.zeros_like(project(p.astype(jnp.float32), pr, side_of(p)))

        mu = jax.tree.map(moment0, params, proj, is_leaf=lambda x: x is None)
        return GaLoreState(
            count=jnp.zeros([], jnp.int32),
            proj_count=jnp.full([], -1, jnp.int32),
            proj=proj,
            mu=mu,
            nu=jax.tree.map(jnp.zeros_like, mu),
            nu_warm=jax.tree.map(lambda m: jnp.zeros(m.shape, bool), mu),
        )

    def update(
        updates: PyTree, state: GaLoreState, params: PyTree = None
    ) -> tuple[PyTree, GaLoreState]:
        del params
        due = (state.count % update_proj_gap == 0) & (state.proj_count != state.count)
        proj = jax.lax.cond(due, lambda: _new_projectors(updates, state.proj), lambda: state.proj)
        proj_count = jnp.where(due, state.count, state.proj_count)
        t = state.count + 1
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t

        def low(g: Array, p: Array | None) -> Array:
            g = g.astype(jnp.float32)
            return g if p is None else project(g, p, side_of(g))

        g_low = jax.tree.map(low, updates, proj, is_leaf=lambda x: x is None)
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, g_low)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, g_low)

        def direction(g: Array, p: Array | None, m: Array, v: Array, warm: Array) -> Array:
            d = (m / bc1) / (jnp.sqrt(jnp.where(warm, v, v / bc2)) + eps)
            if p is not None:
                d = scale * project_back(d, p, side_of(g))
            return d.astype(g.dtype)

        out = jax.tree.map(
            direction, updates, proj, mu, nu, state.nu_warm, is_leaf=lambda x: x is None
        )
        return out, GaLoreState(t, proj_count, proj, mu, nu, state.nu_warm)

    return optax.GradientTransformation(init, update)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    dense_fallback: bool = True,
) -> optax.GradientTransformation:
    """GaLore-AdamW: the GaLore direction, decoupled weight decay in the full space, then -lr."""
    parts = [scale_by_galore(rank, update_proj_gap, scale, b1, b2, eps, dense_fallback)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


# ---- reading and writing the GaLore state inside any (chained) optax state -----------------


def _is_galore(x: Any) -> bool:
    return isinstance(x, GaLoreState)


def find_state(opt_state: PyTree) -> GaLoreState:
    """The single GaLoreState inside an optax state (e.g. a chain)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_galore) if _is_galore(x)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one GaLoreState in the optimizer state, found {len(found)}"
        )
    return found[0]


def _replace(opt_state: PyTree, fn: Any) -> PyTree:
    return jax.tree.map(lambda x: fn(x) if _is_galore(x) else x, opt_state, is_leaf=_is_galore)


def projectors(opt_state: PyTree) -> PyTree:
    """Per-leaf projectors (None for dense-Adam leaves)."""
    return find_state(opt_state).proj


def second_moment(opt_state: PyTree) -> PyTree:
    """Per-leaf Adam second moment, in the projected shape for projected leaves."""
    return find_state(opt_state).nu


def refresh_projectors(opt_state: PyTree, grads: PyTree) -> PyTree:
    """Compute the projectors from ``grads`` now and mark them current for this step, so the next
    ``update`` does not recompute them. Lets a caller seed ``nu`` in the new basis before step 0."""

    def fn(s: GaLoreState) -> GaLoreState:
        return s._replace(proj=_new_projectors(grads, s.proj), proj_count=s.count)

    return _replace(opt_state, fn)


def set_projectors(opt_state: PyTree, proj: PyTree) -> PyTree:
    """Install given projectors (same tree and shapes), marked current for this step."""

    def fn(s: GaLoreState) -> GaLoreState:
        if jax.tree.structure(proj, is_leaf=lambda x: x is None) != jax.tree.structure(
            s.proj, is_leaf=lambda x: x is None
        ):
            raise ValueError("set_projectors: the projector tree does not match the GaLore state")
        return s._replace(proj=proj, proj_count=s.count)

    return _replace(opt_state, fn)


def set_second_moment(opt_state: PyTree, nu: PyTree, *, warm: bool | Array = True) -> PyTree:
    """Replace Adam's second moment. With ``warm`` (may be traced) its positive entries count as
    an unbiased estimate (from another run or the server) and skip the bias correction; the first
    moment keeps its own correction."""

    def fn(s: GaLoreState) -> GaLoreState:
        def cast(old: Array, v: Array) -> Array:
            if v.shape != old.shape:
                raise ValueError(f"set_second_moment: shape {v.shape} != state shape {old.shape}")
            return jnp.asarray(v, old.dtype)

        new = jax.tree.map(cast, s.nu, nu)
        flags = jax.tree.map(lambda v: (v > 0) & jnp.asarray(warm, bool), new)
        return s._replace(nu=new, nu_warm=flags)

    return _replace(opt_state, fn)
