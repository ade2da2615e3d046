"""Masked statistics over (B, T) tensors: sums, means, variances and whitening, and the input checks the
other modules of the package run (shapes, binary and contiguous masks, half precision upcast).
"""

from __future__ import annotations

import torch

Dim = int | tuple[int, ...] | None


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


def _check_same_shape(fn: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError naming `fn` and every argument's shape when the shapes differ."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name}{shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: tensors must have the same shape, got {described}")


def _check_binary(fn: str, mask: torch.Tensor) -> None:
    """Raise ValueError naming the first (row, position) whose mask holds a value other than 0 or 1."""
    if mask.dtype == torch.bool:
        return
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{fn}: mask must hold only 0 and 1, (row, position) {index} holds {mask[index].item()}"
        )


def _check_rows_nonempty(fn: str, mask: torch.Tensor) -> None:
    """Raise ValueError naming the first row of a (B, T) mask with no valid token."""
    empty = ~mask.bool().any(dim=-1)
    if empty.any():
        row = int(empty.nonzero()[0][0])
        raise ValueError(f"{fn}: row {row} of the mask has no valid token")


def _check_contiguous(fn: str, mask: torch.Tensor) -> None:
    """Raise ValueError naming the first row of a (B, T) mask whose valid tokens are not one block."""
    m = mask.bool().to(torch.int8)
    starts = (m[:, 1:] > m[:, :-1]).sum(dim=1) + m[:, 0]
    bad = starts > 1
    if bad.any():
        row = int(bad.nonzero()[0][0])
        raise ValueError(
            f"{fn}: row {row} of the mask has a hole (valid tokens must be one contiguous block)"
        )


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision floats to float32; anything else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with masked positions set to 0 (no arithmetic on the garbage, so no inf/NaN in value or grad)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


# --------------------------------------------------------------------------------------------------------
# Masked statistics (item 17)
# --------------------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None, keepdim: bool = False) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is set; x and mask have the same shape.

    dim=None sums everything (0-dim result); otherwise sums over `dim` like `torch.sum`.
    """
    _check_same_shape("masked_sum", x=x, mask=mask)
    z = _zero_masked(_upcast(x), mask)
    return z.sum() if dim is None else z.sum(dim=dim, keepdim=keepdim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None, keepdim: bool = False) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set.

    dim=None: one mean over all valid entries (0-dim). dim given: a mean per remaining index, e.g. dim=1 on
    (B, T) gives (B,). Raises ValueError if a mean would be over zero valid entries.
    """
    _check_same_shape("masked_mean", x=x, mask=mask)
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim, keepdim=keepdim)
    if (count == 0).any():
        where = "" if dim is None else f" (index {int((count == 0).nonzero()[0][0])} along the kept dims)"
        raise ValueError(f"masked_mean: the mask has no valid entry{where}")
    return masked_sum(x, mask, dim=dim, keepdim=keepdim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False, dim: Dim = None) -> torch.Tensor:
    """Variance of `x` over valid positions; population variance (divide by n) unless `unbiased`.

    Item 17 requires unbiased=False for whitening. With unbiased=True, n must be at least 2.
    """
    x = _zero_masked(_upcast(x), mask)
    mean = masked_mean(x, mask, dim=dim, keepdim=True)
    var = masked_mean((x - mean) ** 2, mask, dim=dim)
    if unbiased:
        count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
        if (count < 2).any():
            raise ValueError("masked_var: unbiased variance needs at least 2 valid entries")
        var = var * count / (count - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten `x` (B, T) with statistics over valid tokens only: (x - mean) * rsqrt(var + eps).

    var is the population variance (item 17). shift_mean=True leaves the result with mean 0 (used for
    advantages); shift_mean=False adds the mean back, i.e. scales only (used for rewards). eps is 1e-8 in
    the references. Returns (B, T), 0 at masked positions.
    """
    x = _zero_masked(_upcast(x), mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=False)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, mask)
