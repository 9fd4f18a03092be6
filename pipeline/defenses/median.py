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
from pipeline.defenses.base import Defense, sort_columns


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
