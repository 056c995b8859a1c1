"""Exactness of the three closed forms on random matrices, each against an independent computation."""

import pytest
import torch

from memoe.editors.closed_form.solves import IllConditionedWarning, emmet_solve, memit_solve, rome_solve, spd_solve

H, D = 12, 20


@pytest.fixture
def mats():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(H, D, generator=g, dtype=torch.float64)
    K0 = torch.randn(D, 200, generator=g, dtype=torch.float64)
    C = K0 @ K0.T / 200
    K = torch.randn(D, 5, generator=g, dtype=torch.float64)
    V = torch.randn(H, 5, generator=g, dtype=torch.float64)
    return W, C, K, V


def test_rome_makes_the_key_map_to_the_value(mats):
    W, C, K, V = mats
    k, v = K[:, :1], V[:, :1]
    delta = rome_solve(v - W @ k, k, C)
    assert torch.allclose((W + delta) @ k, v, atol=1e-10)
    assert torch.linalg.matrix_rank(delta) == 1


def test_rome_single_key_is_the_paper_formula(mats):
    W, C, K, V = mats
    k, r = K[:, :1], V[:, :1] - W @ K[:, :1]
    u = torch.linalg.solve(C, k)
    assert torch.allclose(rome_solve(r, k, C), r @ u.T / (k.T @ u), atol=1e-10)


def test_rome_with_two_keys_of_one_fact_is_rank_one_and_meets_both(mats):
    """Δ = r aᵀ with the least C-norm a meeting Kᵀa = 1: checked against the KKT system solved directly."""
    W, C, K, V = mats
    k2, r = K[:, :2], V[:, :1] - W @ K[:, :1]
    delta = rome_solve(r, k2, C)
    assert torch.linalg.matrix_rank(delta) == 1
    assert torch.allclose(delta @ k2, r.expand(-1, 2), atol=1e-9)  # W'k_j = Wk_j + r for both keys
    kkt = torch.zeros(D + 2, D + 2, dtype=torch.float64)
    kkt[:D, :D], kkt[:D, D:], kkt[D:, :D] = 2 * C, k2, k2.T
    rhs = torch.cat([torch.zeros(D, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
    a = torch.linalg.solve(kkt, rhs)[:D]
    assert torch.allclose(delta, r @ a[None], atol=1e-9)
    with pytest.raises(ValueError, match="one fact at a time"):
        rome_solve(V[:, :2], k2, C)


def test_emmet_equality_for_every_edit(mats):
    W, C, K, V = mats
    delta = emmet_solve(V - W @ K, K, C, 0.0)
    assert torch.allclose((W + delta) @ K, V, atol=1e-9)


def test_emmet_single_edit_equals_rome(mats):
    W, C, K, V = mats
    R = V[:, :1] - W @ K[:, :1]
    assert torch.allclose(emmet_solve(R, K[:, :1], C), rome_solve(R, K[:, :1], C), atol=1e-10)


def test_memit_equals_independent_ridge_least_squares(mats):
    """min_Δ ||(W+Δ)K - V||² + λ tr(Δ C Δᵀ), solved as one stacked least-squares problem by lstsq."""
    W, C, K, V = mats
    lam = 3.0
    R = V - W @ K
    L = torch.linalg.cholesky(C)  # C = L Lᵀ, so tr(Δ C Δᵀ) = ||Δ L||²
    A = torch.cat([K.T, lam ** 0.5 * L.T])  # (N + D, D)
    B = torch.cat([R.T, torch.zeros(D, H, dtype=torch.float64)])
    expected = torch.linalg.lstsq(A, B).solution.T
    assert torch.allclose(memit_solve(R, K, C, lam), expected, atol=1e-9)


def test_scaling_c0_leaves_rome_and_emmet_unchanged(mats):
    W, C, K, V = mats
    R = V - W @ K
    assert torch.allclose(rome_solve(R[:, :1], K[:, :1], C), rome_solve(R[:, :1], K[:, :1], 7.5 * C), atol=1e-10)
    assert torch.allclose(emmet_solve(R, K, C), emmet_solve(R, K, 7.5 * C), atol=1e-9)
    # ...while MEMIT's λ C0 trade-off does move
    assert not torch.allclose(memit_solve(R, K, C, 1.0), memit_solve(R, K, 7.5 * C, 1.0), atol=1e-6)


def test_ill_conditioned_system_warns_and_falls_back_to_ridge(mats):
    W, C, K, V = mats
    low_rank = K[:, :3] @ K[:, :3].T  # rank 3 of 20: singular
    with pytest.warns(IllConditionedWarning, match="EMMET: C0"):
        delta = emmet_solve(V[:, :2] - W @ K[:, :2], K[:, :2], low_rank)
    assert torch.isfinite(delta).all()


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="cannot solve"):
        spd_solve(torch.eye(3), torch.ones(4, 1), "test system")


def test_emmet_with_a_ridge_is_memit_with_that_lambda(mats):
    # Woodbury: Kᵀ(λC + KKᵀ)⁻¹ = (KᵀC⁻¹K + λI)⁻¹KᵀC⁻¹, so EMMET's λ_e ridge is MEMIT's λ (README, closed-form core)
    W, C, K, V = mats
    R = V - W @ K
    for lam in (0.5, 30.0):
        assert torch.allclose(emmet_solve(R, K, C, lam), memit_solve(R, K, C, lam), atol=1e-9)
    assert not torch.allclose(emmet_solve(R, K, C, 0.0), memit_solve(R, K, C, 1e-3), atol=1e-6)
