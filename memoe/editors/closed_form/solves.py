"""The three closed-form solves, on plain float64 matrices (no model): what makes ROME, MEMIT and EMMET differ.

Shapes: R (H, N) residuals of the targets against the current layer output, K (d, N) keys (columns),
C (d, d) the key second moment C0. Each returns the update Δ (H, d) of a down-projection W (H, d).
All three avoid explicit inverses: symmetric positive definite systems go through a Cholesky
factorisation, with a warning and a ridge fallback when a system is ill-conditioned.
"""

from __future__ import annotations

import warnings

import torch

#: Condition number (estimated from the Cholesky factor) above which a ridge is added.
MAX_COND = 1e12


class IllConditionedWarning(UserWarning):
    pass


def spd_solve(A: torch.Tensor, B: torch.Tensor, what: str = "system", max_cond: float = MAX_COND) -> torch.Tensor:
    """Solve A X = B for symmetric positive (semi)definite A in float64 via Cholesky.

    If A is not positive definite or its estimated condition number exceeds ``max_cond``, a ridge
    ``eps * mean(diag A) * I`` is added (eps from 1e-10 up, by factors of 10) and a warning names ``what``.
    """
    A, B = A.double(), B.double()
    if A.shape[0] != A.shape[1] or A.shape[0] != B.shape[0]:
        raise ValueError(f"{what}: matrix of shape {tuple(A.shape)} cannot solve right-hand side of shape {tuple(B.shape)}")
    scale = A.diagonal().abs().mean().clamp_min(1e-300)
    eps = 0.0
    for _attempt in range(16):
        # the ridge goes on a copy's diagonal: no identity matrix (1.6 GB in float64 for Llama-3-8B's d = 14336)
        L, info = torch.linalg.cholesky_ex(A if eps == 0 else _ridged(A, eps * scale))
        if info == 0:
            d = L.diagonal()
            cond = float((d.max() / d.min()) ** 2)
            if cond <= max_cond:
                if eps:
                    warnings.warn(f"{what} is ill-conditioned; solved with ridge {eps:g} x mean diagonal "
                                  f"(condition now ~{cond:.1e})", IllConditionedWarning, stacklevel=3)
                return torch.cholesky_solve(B, L)
        eps = 1e-10 if eps == 0 else eps * 10
    raise ValueError(f"{what} could not be solved even with a ridge of {eps:g} x its mean diagonal")


def _ridged(A: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    """A copy of A with ``ridge`` added to its diagonal."""
    out = A.clone()
    out.diagonal().add_(ridge)
    return out


def rome_solve(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """ROME: Δ = r kᵀ C⁻¹ / (kᵀ C⁻¹ k) for one edit; W'k = Wk + r exactly.

    With several keys K (d, m) of the same fact (m > 1) the update stays rank one, Δ = r aᵀ, with the a of least
    C-norm that meets aᵀ k_j = 1 for every key: a = C⁻¹K (KᵀC⁻¹K)⁻¹ 1, so W'k_j = Wk_j + r for each (m = 1: ROME)."""
    if R.shape[1] != 1:
        raise ValueError(f"ROME edits one fact at a time; got {R.shape[1]} residuals")
    U = spd_solve(C, K, "ROME: C0")  # C⁻¹ K (d, m)
    ones = torch.ones(K.shape[1], 1, dtype=U.dtype, device=U.device)
    a = U @ spd_solve(K.double().T @ U, ones, "ROME: Kᵀ C0⁻¹ K")  # (d, 1)
    return R.double() @ a.T

def memit_solve(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT: Δ = R Kᵀ (λ C + K Kᵀ)⁻¹, least squares with preservation weight λ."""
    K, R = K.double(), R.double()
    A = (K @ K.T).add_(C.double(), alpha=lam)  # in place: one d x d temporary fewer
    return spd_solve(A, K @ R.T, "MEMIT: (lambda C0 + K Kᵀ)").T


def emmet_solve(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam_e: float = 0.0) -> torch.Tensor:
    """EMMET: Δ = R (Kᵀ C⁻¹ K + λ_e I)⁻¹ Kᵀ C⁻¹, equality constraints for every edit (λ_e: small ridge)."""
    K, R = K.double(), R.double()
    U = spd_solve(C.double(), K, "EMMET: C0")  # C⁻¹ K (d, N)
    M = K.T @ U + lam_e * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return spd_solve(M, R.T, "EMMET: (Kᵀ C0⁻¹ K + lambda_e I)").T @ U.T
