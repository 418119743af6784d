"""The shared second moment of K GaLore clients: AJIVE on their projected second moments, and the
change of basis that moves a moment between GaLore subspaces.

Client k holds a projector P_k (``galore.project`` conventions: right side r x n with orthonormal
rows, left side m x r with orthonormal columns) and Adam's second moment nu_k in that basis. The
server's shared moment lives in a basis B of the same form, so it is a GaLore state itself.

Change of basis. nu is a *diagonal* second moment: entry j is the variance along direction j.
Moving it to another basis uses the squared overlaps O = P_to P_from^T (right side), i.e. the
diagonal of the rotated covariance with cross terms dropped: ``nu_to = nu @ (O**2).T``. The
coverage ``c_j = sum(O[j]**2)`` says how much of new direction j the old basis spans; dividing by
it keeps magnitudes honest (a direction half outside must not inherit half a variance). Going
through the full m x n diagonal instead would spread a low-rank gradient's energy over all n
coordinates and shrink the moment by about n/r; the subspace route does not.

Server basis B: the r leading left singular vectors of the stacked client bases
[sqrt(w_1) P_1^T, ..., sqrt(w_K) P_K^T] (w = normalised data weights); for such a direction b,
sigma**2 = sum_k w_k cos^2(b, span P_k). The mean moment in B is the coverage-weighted mean of the
clients' moments moved into B: ``sum_k w_k (nu_k @ (O_k**2).T)[:, a] / sigma_a**2``.

The three server methods (``SyncMethod``):
- ``ajive`` (AJIVE, Feng et al. 2018, rank selection as in the reference implementation
  idc9/py_jive): the blocks are the clients' moments X_k = nu_k, m x r in the right-side
  picture: their m rows are the same coordinates for every client (the side GaLore does not
  project), their r columns the client's own directions. (1) Signal space of each block: its s
  leading left singular vectors U_k (s = ``signal_rank``). (2) Joint space: the SVD of
  [U_1, ..., U_K]; a direction is joint when its squared singular value exceeds the larger of
  the Wedin bound (5th percentile of K - sum_k min(1, max(|X_k^T U_perp|, |X_k V_perp|) /
  sigma_s(X_k))**2 over random orthonormal U_perp, V_perp orthogonal to the block's signal
  space) and the random-direction bound (95th percentile of the largest squared singular value
  of K independent random s-frames). (3) Identifiability: a joint direction u is dropped when
  some block has |X_k^T u| below that block's threshold, halfway between its s-th and (s+1)-th
  singular values. The shared moment is the mean moment in B projected onto the joint space J
  (``J J^T``), clipped at 0: the part of the second moment all clients share.
- ``subspace``: the earlier approximation. Joint directions are those server-basis directions
  with sigma**2 >= ``threshold`` (a fixed threshold on the clients' projector subspaces, not on
  their moments); a random direction scores about r/n.
- ``mean``: all r directions of B, client-specific ones included.
A client then moves the shared moment into its new basis P'; directions of P' covered less than
``MIN_COVERAGE`` by the kept directions get 0 (no information: they start Adam cold).
Zero-weight clients (excluded this round) take no part in any of it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from fedlora_jax.optim.galore import Side, thin_svd

Array = jax.Array
SyncMethod = Literal["ajive", "subspace", "mean"]
METHODS = ("ajive", "subspace", "mean")
MIN_COVERAGE = 0.5  # a new direction must lie at least half inside the shared basis to inherit
_TINY = 1e-6  # sigma**2 below this: a numerically empty direction (e.g. only zero-weight clients)
_FLOOR = float(jnp.finfo(jnp.float32).tiny)  # moments are ~1e-10: no absolute floor above this


def _right(x: Array, side: Side) -> Array:
    """Left-side arrays transposed into the right-side convention (and back: an involution)."""
    return x if side == "right" else jnp.swapaxes(x, -1, -2)


def _normalised(weights: Array) -> Array:
    w = jnp.asarray(weights, jnp.float32)
    return w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)


def change_basis(nu: Array, p_from: Array, p_to: Array, side: Side) -> tuple[Array, Array]:
    """(unnormalised moment in ``p_to``'s basis, coverage [r_to] of each new direction)."""
    nu, p_from, p_to = _right(nu, side), _right(p_from, side), _right(p_to, side)
    o2 = jnp.square(p_to @ p_from.T)  # [r_to, r_from]
    return _right(nu @ o2.T, side), jnp.sum(o2, axis=-1)


def to_basis(nu: Array, p_from: Array, p_to: Array, side: Side) -> Array:
    """Move a second moment into another basis: coverage-normalised, 0 where coverage is low."""
    moved, cover = change_basis(nu, p_from, p_to, side)
    ok = cover >= MIN_COVERAGE
    scale = jnp.where(ok, 1.0 / jnp.where(ok, cover, 1.0), 0.0)
    return _right(_right(moved, side) * scale, side)


@dataclasses.dataclass(frozen=True)
class AjiveSettings:
    """AJIVE's rank selection: ``signal_rank`` s per block (1 <= s <= r // 2, so the random
    directions orthogonal to a block's signal space exist on both sides), the number of random
    samples of each bound and their percentiles (py_jive's defaults)."""

    signal_rank: int
    samples: int = 1000
    wedin_percentile: float = 5.0
    randdir_percentile: float = 95.0


def _orthonormal(x: Array) -> Array:
    """An orthonormal basis [d, s] of the columns of x [d, s] (QR's span, via thin_svd)."""
    return thin_svd(x)[0]


def _op_norm(x: Array) -> Array:
    """Spectral norm of a tall thin x [d, s]: sqrt of the top singular value of x^T x."""
    return jnp.sqrt(jnp.maximum(thin_svd(x.T @ x)[1][0], 0.0))


def _complement_frame(basis: Array, draw: Array) -> Array:
    """A random orthonormal frame orthogonal to the orthonormal columns of ``basis``."""
    return _orthonormal(draw - basis @ (basis.T @ draw))


def wedin_samples(block: Array, s: int, u_draws: Array, v_draws: Array) -> Array:
    """[R] samples of the Wedin bound on sin(angle) between a block's estimated and true signal
    spaces: min(1, max(|X^T U_perp|, |X V_perp|) / sigma_s(X)); ``u_draws`` [R, m, s] and
    ``v_draws`` [R, r, s] are standard normal draws (X is m x r)."""
    u, d, vh = thin_svd(block)
    us, vs = u[:, :s], vh[:s].T

    def one(du: Array, dv: Array) -> Array:
        left = _op_norm(block.T @ _complement_frame(us, du))
        right = _op_norm(block @ _complement_frame(vs, dv))
        return jnp.minimum(jnp.maximum(left, right) / jnp.maximum(d[s - 1], _FLOOR), 1.0)

    return jax.vmap(one)(u_draws, v_draws)


def random_direction_samples(draws: Array, valid: Array) -> Array:
    """[R] largest squared singular values of [Q_1, ..., Q_K] for random orthonormal frames
    Q_k (from ``draws`` [R, K, m, s]); blocks with ``valid`` False are left out."""

    def one(z: Array) -> Array:
        frames = jax.vmap(_orthonormal)(z) * valid[:, None, None]
        stacked = jnp.concatenate(list(frames), axis=-1)  # [m, K s]
        return jnp.square(thin_svd(stacked)[1][0])

    return jax.vmap(one)(draws)


def joint_space(
    blocks: Array, valid: Array, settings: AjiveSettings, key: Array
) -> tuple[Array, Array, dict[str, Array]]:
    """AJIVE on blocks [K, m, r] sharing their m rows: (joint basis [m, s] with the non-joint
    columns zero, joint rank, the bounds {"wedin", "random", "cutoff"} on squared singular
    values and the candidates' squared singular values "sv2")."""
    k, m, r = blocks.shape
    s, n = settings.signal_rank, settings.samples
    valid = valid.astype(bool)
    u, d, _ = thin_svd(blocks)  # [K, m, r], [K, r]
    scores = u[..., :s] * valid[:, None, None]
    joint, sv, _ = thin_svd(jnp.concatenate(list(scores), axis=-1))  # [m, K s]
    sv2 = jnp.square(sv[:s])
    ku, kv, kr = jax.random.split(key, 3)
    u_draws = jax.random.normal(ku, (k, n, m, s))
    v_draws = jax.random.normal(kv, (k, n, r, s))
    wedin = jax.vmap(wedin_samples, in_axes=(0, None, 0, 0))(blocks, s, u_draws, v_draws)
    wedin_sv2 = jnp.sum(valid) - jnp.sum(jnp.where(valid[:, None], jnp.square(wedin), 0.0), 0)
    rand_sv2 = random_direction_samples(jax.random.normal(kr, (n, k, m, s)), valid)
    bounds = {
        "wedin": jnp.percentile(wedin_sv2, settings.wedin_percentile),
        "random": jnp.percentile(rand_sv2, settings.randdir_percentile),
    }
    bounds["cutoff"] = jnp.maximum(bounds["wedin"], bounds["random"])
    candidates = joint[:, :s]
    # Identifiability: every block must carry each joint direction above its own SV threshold.
    threshold = (d[:, s - 1] + d[:, s]) / 2.0  # [K]
    carried = jnp.linalg.norm(jnp.einsum("kmr,ma->kar", blocks, candidates), axis=-1)  # [K, s]
    identifiable = jnp.all((carried >= threshold[:, None]) | ~valid[:, None], axis=0)
    keep = (sv2 > bounds["cutoff"]) & identifiable
    return candidates * keep, jnp.sum(keep).astype(jnp.int32), {**bounds, "sv2": sv2}


def joint_basis(
    projs: Array, weights: Array, method: SyncMethod = "subspace", threshold: float = 0.75
) -> tuple[Array, Array]:
    """Right-side projectors [K, r, n] -> (server basis [r, n], dropped rows zero; sigma**2 [r],
    0 if dropped). ``subspace`` drops directions with sigma**2 < ``threshold``; ``mean`` and
    ``ajive`` keep the r leading directions (AJIVE selects on the moments afterwards)."""
    _check_method(method, threshold)
    k, r, n = projs.shape
    w = _normalised(weights)
    stacked = (projs * jnp.sqrt(w)[:, None, None]).reshape(k * r, n).T  # [n, K r]
    u, sigma, _ = thin_svd(stacked)  # not jnp.linalg.svd: see galore.thin_svd (CPU deadlock)
    s2 = jnp.square(sigma[:r])
    keep = s2 >= (threshold if method == "subspace" else _TINY)
    return (u[:, :r] * keep).T, jnp.where(keep, s2, 0.0)


def _check_method(method: str, threshold: float) -> None:
    if method not in METHODS:
        raise ValueError(
            f"fedgalore sync={method!r} is not known; allowed: {', '.join(METHODS)}, none"
        )
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"fedgalore threshold must be in (0, 1], got {threshold!r}")


def shared_second_moment(
    nus: Array,
    projs: Array,
    weights: Array,
    side: Side,
    method: SyncMethod = "ajive",
    threshold: float = 0.75,
    settings: AjiveSettings | None = None,
    key: Array | None = None,
) -> tuple[Array, Array, Array]:
    """The server's shared moment from K clients' (nu_k, P_k) with a leading axis K.

    Returns (basis shaped like a projector, moment shaped like a client's nu, number of kept
    directions: the joint rank for ``ajive``). ``ajive`` needs ``settings`` and a ``key`` for
    its random bounds. Zero-weight clients contribute nothing.
    """
    _check_method(method, threshold)
    if method == "ajive" and (settings is None or key is None):
        raise ValueError("fedgalore sync='ajive' needs AjiveSettings and a PRNG key")
    nus_r, projs_r = _right(nus, side), _right(projs, side)
    basis, s2 = joint_basis(projs_r, weights, method, threshold)
    moved, _ = jax.vmap(change_basis, in_axes=(0, 0, None, None))(nus_r, projs_r, basis, "right")
    total = jnp.einsum("k,kmr->mr", _normalised(weights), moved)
    shared = jnp.where(s2 > 0, total / jnp.maximum(s2, _TINY), 0.0)
    kept = jnp.sum(s2 > 0).astype(jnp.int32)
    if method == "ajive":
        joint, kept, _ = joint_space(nus_r, jnp.asarray(weights) > 0, settings, key)
        shared = joint @ (joint.T @ shared)  # the joint part of the mean moment
    return _right(basis, side), _right(jnp.maximum(shared, 0.0), side), kept
