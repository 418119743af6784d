"""LoRA-FAIR (issue 13): the server's residual correction ΔB against a numpy least-squares
solution of its objective on hand-made uploads (a rank-2 and a rank-4 client, an excluded one),
the corrected product closer to Σ p_k B_k A_k than FedIT's, and heterogeneous ranks as one
compiled program."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import tiny_stories
from test_methods_lora_agg import (
    aggregated,
    check_heterogeneous_round,
    modules,
    np_products,
    training,
)

from fedlora_jax.algorithms import get
from fedlora_jax.algorithms.base import OptionsError


@pytest.fixture(scope="module")
def model(stories_dir):
    return tiny_stories(stories_dir)


def ridge_lstsq(target, A_bar, B_bar, lam):
    """argmin_X ‖target − (B̄ + X) Ā‖² + λ‖X‖² as one stacked least-squares problem in Xᵀ:
    [Āᵀ; √λ I] Xᵀ ≈ [(target − B̄Ā)ᵀ; 0] (numpy, float64)."""
    r = A_bar.shape[0]
    lhs = np.vstack([A_bar.T, np.sqrt(lam) * np.eye(r)])
    rhs = np.vstack([(target - B_bar @ A_bar).T, np.zeros((r, target.shape[0]))])
    return np.linalg.lstsq(lhs, rhs, rcond=None)[0].T


@pytest.mark.parametrize("lam", [0.0, 0.01, 1.0])
def test_lora_fair_aggregate_solves_its_objective(model, lam):
    """A = Ā exactly; B = B̄ + ΔB with ΔB the numpy least-squares minimiser; the excluded
    client's NaN rows stay out."""
    _, uploads, new = aggregated("lora_fair", model[0], client_ranks="2,4,2,4", lam=lam)
    ups = modules(uploads)
    for path, leaf in modules(new.params).items():
        prod, A_bar, B_bar = np_products(ups[path])
        np.testing.assert_allclose(leaf["A"], A_bar, rtol=1e-5, atol=1e-6, err_msg=path)
        want = B_bar + ridge_lstsq(prod, A_bar, B_bar, lam)
        np.testing.assert_allclose(leaf["B"], want, rtol=1e-4, atol=1e-5, err_msg=path)


def test_lora_fair_is_closer_to_the_mean_product_than_fedit(model):
    """On the same uploads FedIT's B̄Ā misses Σ p_k B_k A_k; LoRA-FAIR's (B̄ + ΔB)Ā is closer
    (not exact: Ā spans only r rows)."""
    _, uploads, fair = aggregated("lora_fair", model[0], client_ranks="2,4,2,4")
    _, _, fedit = aggregated("fedit", model[0])
    ups, fair_m, fedit_m = modules(uploads), modules(fair.params), modules(fedit.params)
    for path, up in ups.items():
        prod, _, _ = np_products(up)
        np.testing.assert_array_equal(fair_m[path]["A"], fedit_m[path]["A"])
        assert miss(fair_m[path], prod) < 0.9 * miss(fedit_m[path], prod), path


def miss(leaf, target):
    """‖B A − target‖_F of a global leaf."""
    return np.linalg.norm(np.asarray(leaf["B"], np.float64) @ np.asarray(leaf["A"]) - target)


def test_heterogeneous_round_is_one_program_with_zero_padding(model):
    check_heterogeneous_round(model, "lora_fair")


def test_bad_option_is_one_line(model):
    with pytest.raises(OptionsError, match="lam=-1.0 must be >= 0; valid options of lora_fair"):
        get("lora_fair")(training(model[0]), lam=-1)
