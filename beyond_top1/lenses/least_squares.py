"""Streaming closed-form least squares: accumulate the normal equations, solve once.

:class:`LeastSquaresAccumulator` keeps ``XᵀX`` and ``XᵀY`` (with a column of ones for the bias)
in float64, so its memory is ``O(d²)`` whatever the number of tokens, and the solution does not
depend on how the tokens were batched (up to rounding). One accumulator can hold several
independent maps (``n_maps``), e.g. one per source layer, all updated with one batched GEMM.

**Ridge scaling.** ``solve(ridge)`` adds ``ridge · mean(diag XᵀX)`` to the diagonal, i.e.
``ridge · n · mean_j E[x_j²]``. The penalty thus scales with the token count *and* with the
magnitude of the inputs, which grows by orders of magnitude across layers and models, so one
relative value (default ``1e-4``) means the same at every layer of every model. Each map gets its
own scale. The bias is never penalised.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from beyond_top1 import distributed

DEFAULT_RIDGE = 1e-4


class LeastSquaresAccumulator:
    """Normal equations of ``Y ≈ X W (+ b)``, accumulated batch by batch in float64.

    With ``n_maps=None`` it fits one map: ``update(X [n, d_in], Y [n, d_out])``. With
    ``n_maps=m`` it fits ``m`` independent maps: ``X`` is ``[n, m, d_in]`` and ``Y`` is either
    ``[n, d_out]`` (one target shared by every map, e.g. the last layer) or ``[n, m, d_out]``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        bias: bool,
        n_maps: int | None = None,
        device: torch.device | str | None = None,
    ):
        self.d_in, self.d_out, self.bias, self.n_maps = d_in, d_out, bias, n_maps
        self.n_tokens = 0
        m, d = 1 if n_maps is None else n_maps, d_in + int(bias)
        self.gram = torch.zeros(m, d, d, dtype=torch.float64, device=device)
        self.cross = torch.zeros(m, d, d_out, dtype=torch.float64, device=device)

    def update(self, X: Float[Tensor, "n *maps d_in"], Y: Float[Tensor, "n *maps d_out"]) -> None:
        """Add a batch of rows. Inputs may be any float dtype and device."""
        x, y = self._check(X, Y)
        if self.bias:
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        xt = x.permute(1, 2, 0)  # [m, d, n]
        self.gram += xt @ xt.transpose(1, 2)
        self.cross += xt @ (y if y.ndim == 2 else y.transpose(0, 1))
        self.n_tokens += x.shape[0]

    def all_reduce(self, where=None) -> LeastSquaresAccumulator:
        """Sum the normal equations and row counts over ``torchrun`` ranks (float64), so every
        rank then solves the same system as one process over all the rows would (up to the
        order of float64 additions). A no-op in a single process."""
        where = where or distributed.ranks()
        if where.active:
            distributed.all_reduce_sum(self.gram, where)
            distributed.all_reduce_sum(self.cross, where)
            count = torch.tensor([float(self.n_tokens)], dtype=torch.float64)
            self.n_tokens = int(distributed.all_reduce_sum(count.to(self.gram.device), where))
        return self

    def solve(
        self, ridge: float = DEFAULT_RIDGE
    ) -> tuple[Float[Tensor, "*maps d_in d_out"], Float[Tensor, "*maps d_out"] | None]:
        """Solve ``(XᵀX + λI) W = XᵀY`` with ``λ = ridge · mean(diag XᵀX)`` (float64).

        Returns ``(W, b)``; ``b`` is ``None`` without a bias. Leading ``maps`` dim iff
        ``n_maps`` was given.
        """
        if self.n_tokens == 0:
            raise ValueError("no rows accumulated: call update() with some data before solve()")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        d = self.d_in
        gram = self.gram.clone()
        diagonal = gram.diagonal(dim1=-2, dim2=-1)[:, :d]
        diagonal += ridge * diagonal.mean(-1, keepdim=True)
        factor, info = torch.linalg.cholesky_ex(gram)
        if bool((info > 0).any()):
            bad = torch.nonzero(info > 0).flatten().tolist()
            raise ValueError(
                f"the normal equations of map(s) {bad} are singular ({self.n_tokens} rows, "
                f"d_in={d}): pass ridge > 0 or accumulate more rows"
            )
        solution = torch.cholesky_solve(self.cross, factor)
        weight = solution[:, :d]
        bias = solution[:, d] if self.bias else None
        if self.n_maps is None:
            return weight[0], None if bias is None else bias[0]
        return weight, bias

    def _check(self, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """Validate shapes; return float64 copies on this device with a ``maps`` dim on ``X``."""
        maps = () if self.n_maps is None else (self.n_maps,)
        n = X.shape[0] if X.ndim else 0
        if tuple(X.shape) != (n, *maps, self.d_in):
            raise ValueError(f"X must have shape {('n', *maps, self.d_in)}, got {tuple(X.shape)}")
        if tuple(Y.shape) not in {(n, self.d_out), (n, *maps, self.d_out)}:
            raise ValueError(
                f"Y must have shape {(n, self.d_out)} or {(n, *maps, self.d_out)} "
                f"(same rows as X), got {tuple(Y.shape)}"
            )
        x = X.to(self.gram.device, torch.float64)
        y = Y.to(self.gram.device, torch.float64)
        return (x if maps else x[:, None]), y


__all__ = ["DEFAULT_RIDGE", "LeastSquaresAccumulator"]
