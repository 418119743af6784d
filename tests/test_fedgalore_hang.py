"""FedGaLore's first round must finish on a small CPU (issue 11, item 5), and ``thin_svd`` — the
SVD that avoids jaxlib's batched-LAPACK thread-pool deadlock — must be the plain SVD."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedlora_jax
from fedlora_jax.optim.galore import thin_svd

TIMEOUT_S = 120

# Exactly the round. The child pins itself to two CPUs before importing jax, so XLA's
# intra-op pool has two threads (it is sized from the CPU affinity) and the deadlock that needs
# as many concurrent batched SVDs as pool threads (q and v: two) can happen on any machine.
ROUND = textwrap.dedent(
    """
    import os
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:2])
    import numpy as np
    from fedlora_jax.model.hub import resolve_model
    from fedlora_jax.adapters import AdapterConfig
    from fedlora_jax.algorithms import ClientTraining, get
    from fedlora_jax.federated.engine import EngineConfig, init_state, run_round
    m = resolve_model("stories260k")
    ac = AdapterConfig(kind="dense_delta", r=4, targets="qv")
    tr = ClientTraining(model=m.cfg, adapter=ac, local_steps=3, lr=1e-2)
    alg = get("fedgalore")(tr, rank=4, targets="qv")
    state = init_state(alg, m.base, 3, 0)
    tok = np.random.default_rng(0).integers(1, 512, size=(3, 3, 2, 16)).astype(np.int32)
    lm = np.zeros_like(tok); lm[..., 8:] = 1
    run_round(alg, state, m.base, {"tokens": tok, "loss_mask": lm, "attn_mask": np.ones_like(tok)},
              [10, 20, 30], EngineConfig(donate=False))
    print("round finished")
    """
)


def test_fedgalore_qv_round_finishes_on_two_cpus(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "round.py"
    script.write_text(ROUND)
    package_root = pathlib.Path(fedlora_jax.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # threads on, as by default
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fedgalore targets='qv' round did not finish in {TIMEOUT_S} s (hang)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round finished" in done.stdout


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (3, 2, 5, 4)])
def test_thin_svd_is_numpys_svd(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    u, s, vh = map(np.asarray, jax.jit(thin_svd)(jnp.asarray(x)))
    np.testing.assert_allclose(s, np.linalg.svd(x, compute_uv=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.einsum("...mr,...r,...rn->...mn", u, s, vh), x, atol=1e-5)
    k = min(shape[-2:])
    eye = np.broadcast_to(np.eye(k), (*shape[:-2], k, k))
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, eye, atol=1e-5)
    np.testing.assert_allclose(vh @ np.swapaxes(vh, -1, -2), eye, atol=1e-5)


def test_thin_svd_under_nested_vmap_calls_lapack_one_matrix_at_a_time() -> None:
    x = np.random.default_rng(2).normal(size=(3, 4, 7, 5)).astype(np.float32)
    f = jax.jit(jax.vmap(jax.vmap(thin_svd)))
    s = np.asarray(f(jnp.asarray(x))[1])
    np.testing.assert_allclose(s, np.linalg.svd(x, compute_uv=False), rtol=1e-5, atol=1e-5)
    # Half-batched (vmap of an unbatched input) broadcasts like jnp.linalg.svd would.
    s1 = jax.vmap(lambda _: thin_svd(jnp.asarray(x[0, 0]))[1])(jnp.arange(2))
    np.testing.assert_allclose(s1, np.broadcast_to(s[0, 0], (2, 5)), rtol=1e-5, atol=1e-6)
    if jax.default_backend() == "cpu":
        text = f.lower(jnp.asarray(x)).as_text()
        operands = re.findall(r"@lapack_\w*gesdd\w*\(.*?:\s*\((tensor<[^>]*>)", text)
        assert operands, "no LAPACK SVD call found in the lowered program"
        assert all(op.count("x") == 2 for op in operands), operands  # m x n x f32: one matrix
