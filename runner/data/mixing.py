"""How many training rows each [[dataset.sources]] table gives the mix, and which ones. Pure
arithmetic (no datasets import), so the proportions are tested on their own.

Weights: the mix has dataset.max_rows rows, or fewer: the most the sources give with no row taken
twice (the source that runs out first sets it); each source's count is its share rounded by
largest remainder, so the counts add up to the mix exactly. Without weights each source gives
`rows` rows, or all its rows. A source asked for more rows than it has is repeated: all of its
(shuffled) rows as many whole times as fit, then its first rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EPSILON = 1e-9  # 0.1 * 30 is 3.0000000000000004: a share that fills its source exactly


def mix_counts(
    available: Sequence[int],
    weights: Sequence[float | None],
    rows: Sequence[int | None],
    max_rows: int | None = None,
) -> list[int]:
    """Training rows to take from each source (in source order)."""
    if not any(w is not None for w in weights):
        return [a if r is None else r for a, r in zip(available, rows, strict=True)]
    given = [float(w or 0.0) for w in weights]
    total = sum(given)
    shares = [w / total for w in given]
    size = min(math.floor(a / p + EPSILON) for a, p in zip(available, shares, strict=True) if p)
    if max_rows is not None:
        size = min(size, max_rows)
    exact = [size * p for p in shares]
    counts = [math.floor(x + EPSILON) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return [min(c, a) for c, a in zip(counts, available, strict=True)]


def pick(count: int, available: int) -> list[int]:
    """Row positions for `count` rows of a source of `available` (shuffled) rows: whole passes,
    then the first rows (a source with no rows gives none)."""
    if available == 0:
        return []
    whole, rest = divmod(count, available)
    return [*range(available)] * whole + [*range(rest)]
