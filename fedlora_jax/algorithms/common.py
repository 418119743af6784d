"""A helper the algorithms share: a PRNG key in a form a checkpointed state can hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def raw_key(key: Array) -> Array:
    """A uint32 key (typed keys converted) so it can live in a checkpointed state."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key
