"""What the engine tells an algorithm about the round it is in (every phase function gets one)."""

from __future__ import annotations

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class RoundInfo:
    """``round`` (0-based) and ``key`` (the server's key for this phase: noise, sampling) are
    traced arrays; ``total_rounds`` (None when the caller did not say) and ``num_clients`` (N)
    are static, so algorithms can branch on them in Python."""

    round: Array
    key: Array
    total_rounds: int | None = struct.field(pytree_node=False, default=None)
    num_clients: int = struct.field(pytree_node=False, default=0)

    @property
    def is_last(self) -> Array:
        """True in the last round; an error when the run length is unknown."""
        if self.total_rounds is None:
            raise ValueError("this algorithm needs the run length: set EngineConfig.rounds")
        return self.round >= self.total_rounds - 1
