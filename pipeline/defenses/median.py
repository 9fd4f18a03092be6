"""Coordinate-wise median (Yin, Chen, Ramchandran & Bartlett, "Byzantine-robust
distributed learning: towards optimal statistical rates", ICML 2018).

Even counts: the mean of the two middle values, computed as
``torch.quantile(q=0.5)`` does (``lo.lerp(hi, 0.5)``), which is also
``numpy.median``'s convention and byzfl's ``Median``; not ``torch.median``
(the lower middle value). With NaN (not uploaded) it is ``torch.nanquantile``'s
median, without that function's size limit.
"""

from __future__ import annotations

from pipeline.lazy import torch

from pipeline.core.server import Aggregate, Uploads
from pipeline.defenses import register
from pipeline.defenses.base import Defense, argsort_columns, sort_columns


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per column of ``x`` (n, P), the median of its non-NaN values (mean of
    the two middle ones for an even count); 0 where a column is all NaN. (P,)."""
    ordered = sort_columns(x)  # NaN sort last
    count = (~torch.isnan(x)).sum(0)
    lo = ordered.gather(0, ((count - 1).clamp_min(0) // 2)[None]).squeeze(0)
    hi = ordered.gather(0, (count // 2).clamp_max(x.shape[0] - 1)[None]).squeeze(0)
    half = torch.where(count % 2 == 0, 0.5, 0.0).to(x.dtype)
    return torch.where(count > 0, lo.lerp(hi, half), 0).to(x.dtype)


@register
class Median(Defense):
    """Every coordinate's median over the users who uploaded it; nobody is left out."""

    name = "median"
    summary = "coordinate-wise median (Yin et al. 2018) over the users who uploaded each coordinate"
    flags = "none"
    composable = True
    handles_missing = True

    def aggregate(self, uploads: Uploads) -> Aggregate:
        return Aggregate(coordinate_median(uploads.updates))


def smallest_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Per column of ``values`` (n, P; >= 0, no NaN), the rows of its ``k`` smallest, smallest first, ties to
    the lower row: ``argsort(dim=0, stable=True)[:k]``, by a partial selection (``topk``) instead of a sort.
    Each value becomes a unique integer key ordered as (value, row): a non-negative float32's bits, read as an
    integer, order as the float does, and the row fills the low bits. (k, P)."""
    if values.dtype != torch.float32:  # the key trick needs 32-bit floats
        return argsort_columns(values)[:k]
    n = values.shape[0]
    bits = max(1, (n - 1).bit_length())
    rows = torch.arange(n, device=values.device)[:, None]
    keys = (values.view(torch.int32).to(torch.int64) << bits) | rows
    return keys.topk(k, dim=0, largest=False, sorted=True).values & ((1 << bits) - 1)


def closest_to_median_mean(x: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column of ``x`` (n, P), the mean of the ``beta`` values closest to the column's median. (P,)."""
    distance = (x - coordinate_median(x)).abs()
    return x.gather(0, smallest_rows(distance, beta)).mean(0)
