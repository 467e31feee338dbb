"""SparseGPT-style pruning of one layer: OBS removal with reconstruction of the survivors.

For a layer W (rows x columns) and the Gram matrix H = X^T X of its calibration inputs, columns
are processed left to right in blocks. Inside a block the weights to remove are chosen by the
OBS saliency w^2 / [H^-1]_jj^2; each removed or kept column's rounding error is pushed onto the
not-yet-processed columns through the Cholesky factor of H^-1, so the layer's output on the
calibration inputs changes as little as possible (Frantar & Alistarh, 2023).

The number removed per block follows the layer's budget cumulatively, so the layer loses exactly
``k`` weights whatever its allocation; with an N:M pattern the choice is made per group of M.

Everything runs in float32 on the device of the Gram matrix (the model's device): the Gram matrix
is the *mean* of x x^T over samples (entries stay O(activation^2) whatever the calibration size)
and is damped by ``damp`` x its mean diagonal before the Cholesky factorisations; a failed or
non-finite factorisation retries with ten times more damping (``inverse_hessian_factor``).
"""

from __future__ import annotations

import torch

from starfish.errors import StarfishError


def inverse_hessian_factor(gram: torch.Tensor, damp: float, retries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float32, dead inputs made harmless."""
    h = gram.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.diag(h).mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries):
        damped = h + eye * (damp * mean_diag * (10**attempt))
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
    raise StarfishError("the calibration Hessian is singular even after damping; raise --sparsegpt-damp.")


def block_budgets(k: int, columns: int, blocksize: int) -> list[int]:
    """How many weights each column block removes so that the total is exactly ``k``."""
    edges = list(range(0, columns, blocksize)) + [columns]
    cum = [round(k * e / columns) for e in edges]
    return [cum[i + 1] - cum[i] for i in range(len(edges) - 1)]


@torch.no_grad()
def sparsegpt_layer(
    weight: torch.Tensor,
    gram: torch.Tensor,
    k: int,
    pattern: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (new weight, keep-mask) with exactly ``k`` weights removed (or the N:M pattern)."""
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).to(gram.device, torch.float32).clone()
    rows, cols = w.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"Gram matrix {tuple(gram.shape)} does not fit a weight with {cols} columns")
    if pattern is not None:
        n, m = pattern
        if cols % m or blocksize % m:
            raise StarfishError(f"N:M with M={m} needs rows and the SparseGPT block size to be multiples of {m}.")
    u = inverse_hessian_factor(gram, damp)
    removed = torch.zeros_like(w, dtype=torch.bool)
    budgets = block_budgets(k, cols, blocksize)
    for b, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        w1 = w[:, start:end].clone()
        u1 = u[start:end, start:end]
        err1 = torch.zeros_like(w1)
        d = torch.diag(u1)
        gone = torch.zeros_like(w1, dtype=torch.bool)
        if pattern is None and budgets[b] > 0:
            saliency = (w1**2) / (d.unsqueeze(0) ** 2)
            gone.view(-1)[torch.argsort(saliency.flatten(), stable=True)[: budgets[b]]] = True
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                sal = (w1[:, i : i + m] ** 2) / (d[i : i + m].unsqueeze(0) ** 2)
                low = torch.argsort(sal, dim=1, stable=True)[:, : m - n]
                gone[:, i : i + m].scatter_(1, low, True)
            col = w1[:, i]
            q = torch.where(gone[:, i], torch.zeros_like(col), col)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, start:end] = w1
        removed[:, start:end] = gone
        w[:, end:] -= err1 @ u[start:end, end:]
    w[removed] = 0.0
    return w.to(weight.device, weight.dtype).view(shape), (~removed).to(weight.device).view(shape)
