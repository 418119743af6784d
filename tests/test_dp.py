"""DP-FedAvg (issue 17): clipping on real uploads, the noise's standard deviation, the accountant
against dp-accounting and the analytic Gaussian mechanism, σ calibration, the budget stop with
resume, adaptive clipping's update, and the refusal of methods DP of a mean does not cover."""

from __future__ import annotations

import math
import pathlib

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats
from test_engine import SIZES, STEPS, N, make_batches, tiny_stories

from fedlora_jax import runner
from fedlora_jax.adapters import AdapterConfig
from fedlora_jax.algorithms import ClientTraining, get
from fedlora_jax.config import ConfigError, load_config
from fedlora_jax.federated import engine as E
from fedlora_jax.privacy import Mechanism, accountant, privatise
from fedlora_jax.privacy.mechanism import ClipState, clip_updates, gaussian_sum
from fedlora_jax.privacy.private import DpSettings

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{REPO / 'configs' / 'dolly.py'}:smoke"


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


def training(model_cfg, kind="lora") -> ClientTraining:
    adapter = AdapterConfig(kind=kind, r=2, targets="qv")
    return ClientTraining(model=model_cfg, adapter=adapter, local_steps=STEPS, lr=1e-2)


def settings(z=1.0, clip=1.0, rate=1.0, **kw) -> DpSettings:
    return DpSettings(Mechanism(z, "poisson", N, rate, N), clip, 1e-5, None, **kw)


def np_norms(tree) -> np.ndarray:
    leaves = [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)]
    return np.sqrt(sum((x**2).sum(1) for x in leaves))


# ----------------------------------------------------------------------------- the mechanism


def test_clipping_bounds_every_real_upload_and_leaves_small_ones_untouched(model):
    """A real round's uploads (stories260K, FedIT, all 4 clients): with C between the smallest
    and largest update norm, every clipped update has norm <= C (numpy, float64), and every
    update whose norm was below C is bitwise unchanged."""
    cfg, base = model
    alg = get("fedit")(training(cfg))
    state = E.init_state(alg, base, N, seed=0)
    ids = np.arange(N, dtype=np.int32)
    batches = {k: v[:, :STEPS] for k, v in make_batches().items() if k != "poison"}
    core = E._phase_core(alg.phases[0], E.EngineConfig(backend="debug", rounds=1), N)
    out = core(base, state.server_state, state.client_states, ids, batches, state.rng,
               np.int32(0), np.int32(0), SIZES)  # fmt: skip
    uploads = out[6]
    origin = alg.phases[0].upload_origin(state.server_state)
    updates = jax.tree.map(lambda u, o: u - o[None], uploads, origin)
    norms = np_norms(updates)
    clip = float(np.median(norms))
    assert norms.min() < clip < norms.max()
    transform = clip_updates(clip)
    info = E.RoundInfo(jnp.int32(0), jax.random.key(0), 1, N)
    clipped, ones, st = transform.update(updates, jnp.asarray(SIZES), transform.init(None), info)
    after = np_norms(clipped)
    assert np.all(after <= clip * (1 + 1e-6)), (after, clip)
    np.testing.assert_allclose(after[norms > clip], clip, rtol=1e-5)
    for k in np.flatnonzero(norms <= clip):
        for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(updates), strict=True):
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    np.testing.assert_array_equal(np.asarray(ones), np.ones(N))
    assert float(st.fraction) == pytest.approx(np.mean(norms > clip))


def test_noise_has_the_configured_standard_deviation(model):
    """FedIT's aggregate, privatised, on zero updates: the release minus the global model is
    N(0, (σC/m)²) per coordinate. Sample std within 5 standard errors (s/sqrt(2n)) of σC/m."""
    cfg, base = model
    z, clip, rate = 1.3, 0.7, 0.5
    dp = settings(z, clip, rate)
    alg = privatise(get("fedit")(training(cfg)), dp)
    server, _ = alg.init(jax.random.key(0), base, N)
    origin = alg.phases[0].upload_origin(server.inner)
    uploads = jax.tree.map(lambda x: jnp.stack([x] * N), origin)
    info = E.RoundInfo(jnp.int32(0), jax.random.key(7), 1, N)
    new = alg.phases[0].aggregate(server, uploads, jnp.asarray(SIZES), jnp.arange(N), info)
    noise = np.concatenate(
        [np.ravel(np.asarray(a, np.float64) - np.asarray(b)) for a, b in zip(
            jax.tree.leaves(new.inner.params), jax.tree.leaves(origin), strict=True)]
    )  # fmt: skip
    expected = z * clip / (rate * N)
    n = noise.size
    assert n > 500  # the 5-standard-error band is then within 12%
    assert abs(noise.std() - expected) < 5 * expected / math.sqrt(2 * n), (noise.std(), expected)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(n)


def test_gaussian_sum_divides_the_masked_sum_by_the_fixed_denominator():
    u = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, 9.0]])}
    out = gaussian_sum(0.0, 4.0)(u, jnp.array([1.0, 1.0, 0.0]), jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out["a"]), [1.0, 1.5])  # (1+3)/4, (2+4)/4


def test_adaptive_clip_follows_the_quantile_by_the_geometric_update():
    """Norms 1, 2, 3, 4 and C = 1.5: one update of four is unclipped, b = 1/4; with negligible
    count noise C <- 1.5 * exp(-0.2 * (0.25 - 0.5)) (Andrew et al. 2021, eq. 2)."""
    updates = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]])}
    t = clip_updates(1.5, adaptive=True, target_quantile=0.5, learning_rate=0.2,
                     count_stddev=1e-9, expected_clients=4.0)  # fmt: skip
    info = E.RoundInfo(jnp.int32(0), jax.random.key(0), 1, 4)
    _, _, st = t.update(updates, jnp.ones(4), t.init(None), info)
    assert float(st.noisy_unclipped) == pytest.approx(0.25, abs=1e-6)
    assert float(st.clip) == pytest.approx(1.5 * math.exp(0.05), rel=1e-6)
    assert float(st.used) == 1.5 and float(st.fraction) == 0.75
    assert isinstance(st, ClipState)


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_epsilon_equals_dp_accounting_called_directly(name):
    q, z, rounds, delta = 0.25, 1.1, 30, 1e-5
    m = Mechanism(z, "poisson", 16, q, 4, name)
    acc = dp_accounting.pld.PLDAccountant() if name == "pld" else dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert accountant.epsilon(m, rounds, delta) == acc.get_epsilon(delta)


def test_fixed_size_sampling_is_accounted_without_replacement_at_half_the_multiplier():
    """m of N without replacement: replace-one neighbours, sensitivity 2C, so z / 2."""
    m = Mechanism(2.0, "fixed", 16, 0.25, 4, "rdp")
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    event = dp_accounting.GaussianDpEvent(1.0)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(16, 4, event), 10)
    assert accountant.epsilon(m, 10, 1e-5) == acc.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="needs dp.accountant='rdp'"):
        Mechanism(2.0, "fixed", 16, 0.25, 4, "pld")


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018 (Theorem 8): the exact ε of a Gaussian mechanism of noise multiplier
    σ at δ, from δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ)."""

    def gap(eps: float) -> float:
        a = stats.norm.cdf(0.5 / sigma - eps * sigma)
        b = math.exp(eps) * stats.norm.cdf(-0.5 / sigma - eps * sigma)
        return a - b - delta

    return optimize.brentq(gap, 0.0, 100.0, xtol=1e-10)


@pytest.mark.parametrize("rounds", [1, 10])
def test_full_participation_matches_the_analytic_gaussian_mechanism(rounds):
    """q = 1: T rounds of multiplier z are one Gaussian of multiplier z/√T; the PLD accountant
    agrees with the exact formula to 1e-3 (its discretisation, pessimistic)."""
    z, delta = 2.0, 1e-5
    got = accountant.epsilon(Mechanism(z, "poisson", 4, 1.0, 4, "pld"), rounds, delta)
    exact = analytic_gaussian_epsilon(z / math.sqrt(rounds), delta)
    assert exact <= got <= exact + 1e-3, (got, exact)


def test_epsilon_grows_with_rounds_and_calibration_hits_the_target():
    m = Mechanism(0.0, "poisson", 8, 0.5, 4, "pld")
    z = accountant.calibrate(m, 20, 2.0, 1e-5)
    eps = [accountant.epsilon(m, r, 1e-5, z) for r in (1, 5, 10, 20)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert 2.0 - 0.01 <= eps[-1] <= 2.0
    assert accountant.epsilon(m, 20, 1e-5, z - 0.01) > 2.0  # nothing much smaller suffices


# ----------------------------------------------------------------------------- runs


def dp_config(out_dir, *overrides):
    base = [f"run.out_dir={out_dir}", "dp.enabled=True", "dp.clip=0.05", "eval.every=0"]
    return load_config(SMOKE, [*base, *overrides])


def test_budget_stop_after_round_3_with_a_checkpoint_and_resume_trains_no_further(tmp_path):
    """σ = 1, q = 1, budget halfway between ε(3) and ε(4) (dp-accounting called directly): the
    5-round run stops after round 3 with a checkpoint; --resume stops again before training."""

    def eps(rounds):
        acc = dp_accounting.pld.PLDAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.0)),
                    rounds)  # fmt: skip
        return acc.get_epsilon(1e-5)

    budget = (eps(3) + eps(4)) / 2
    cfg = dp_config(tmp_path, "federated.rounds=5", "dp.noise_multiplier=1.0",
                    f"dp.target_epsilon={budget}")  # fmt: skip
    result = runner.run(cfg, progress=False)
    assert result.stopped and "privacy budget spent" in result.stopped
    assert result.state.round == 3 and len(result.history) == 3 and result.final_eval is None
    epsilons = [row["dp/epsilon"] for row in result.history]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(eps(3))
    ckpt = result.run_dir / runner.CHECKPOINT_DIR
    assert (ckpt / "3").exists()
    again = runner.run(cfg, resume=True, progress=False)
    assert again.state.round == 3 and len(again.history) == 3 and again.stopped
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all('"dp/epsilon"' in line for line in lines)
    assert "DP ε" in (result.run_dir / "results.md").read_text()


def test_fedalt_is_refused_in_one_line(tmp_path):
    cfg = dp_config(tmp_path, "algorithm.name=fedalt", "dp.noise_multiplier=1.0")
    with pytest.raises(ConfigError) as e:
        runner.build(cfg, verbose=False)
    assert "\n" not in str(e.value)
    assert "fedalt" in str(e.value) and "central DP of their mean does not cover it" in str(e.value)


@pytest.mark.parametrize(("name", "options"), [("local_only", {}), ("fedavg", {})])
def test_refusal_is_decided_by_the_declared_property(model, name, options):
    """Local-only uploads nothing; FedAvg with SCAFFOLD-free placement is accepted."""
    cfg, _ = model
    if name == "fedavg":
        privatise(get("fedit")(training(cfg)), settings())  # declares upload_origin: accepted
        return
    with pytest.raises(ValueError, match="uploads nothing"):
        privatise(get(name)(training(cfg)), settings())


def test_an_empty_poisson_draw_still_releases_noise(model):
    """Rate so small that no client is drawn: the engine trains nobody and the server model
    still moves by the noise (origin + N(0, σ²C²)/m), never stays silently unchanged."""
    cfg, base = model
    dp = settings(1.0, 1.0, rate=1e-6)
    alg = privatise(get("fedit")(training(cfg)), dp)
    state = E.init_state(alg, base, N, seed=0)
    before = jax.tree.map(np.asarray, state.server_state.inner.params)
    config = E.EngineConfig(sampling_rate=1e-6, rounds=1, donate=False)
    new, metrics = E.run_round(alg, state, base, make_batches(), SIZES, config)
    assert metrics["clients"] == [] and new.round == 1
    moved = [
        np.abs(np.asarray(a) - b).max()
        for a, b in zip(
            jax.tree.leaves(new.server_state.inner.params), jax.tree.leaves(before), strict=True
        )
    ]
    assert min(moved) > 0 and all(np.isfinite(moved))
