"""Success-rate statistics for evaluations with few episodes."""

from __future__ import annotations

import math

# The standard normal's 97.5% quantile: a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a success rate (Wilson 1927).

    Chosen over the normal ("Wald") interval because evaluations have 10-50 episodes and
    rates near 0 or 1, where Wald collapses to zero width (0/10 would claim [0, 0]).
    No trials: nothing is known, (0, 1).
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in 0..trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    # At 0/n and n/n the bound is exactly 0 or 1; the formula leaves rounding noise there.
    lo = 0.0 if successes == 0 else centre - half
    hi = 1.0 if successes == trials else centre + half
    return lo, hi


def format_rate(successes: int, trials: int) -> str:
    """'85% [64, 95] (17/20)': the rate, its 95% Wilson interval in percent, and the counts."""
    lo, hi = wilson_interval(successes, trials)
    rate = successes / trials if trials else float("nan")
    return f"{rate:.0%} [{lo * 100:.0f}, {hi * 100:.0f}] ({successes}/{trials})"


def sign_test(only_a: int, only_b: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) for two policies run on the same layouts.

    Only the discordant layouts count: `only_a` where A alone succeeded, `only_b` where B alone
    did. Under "neither is better" each is a fair coin flip, so p is the probability of a split at
    least this uneven. Why not compare two Wilson intervals: paired layouts remove the layouts'
    own difficulty, which dominates a 50-episode rate.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0, got {only_a} and {only_b}")
    n, k = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def discordant_pairs(a: list[dict], b: list[dict]) -> tuple[int, int]:
    """Two evaluations' per-episode results ({"seed": layout seed, "success": bool}) -> (layouts only A
    solved, layouts only B solved), the counts `sign_test` takes. Layouts only one of them ran are left out."""
    b_success = {e["seed"]: e["success"] for e in b}
    shared = [(e["success"], b_success[e["seed"]]) for e in a if e["seed"] in b_success]
    return sum(x and not y for x, y in shared), sum(y and not x for x, y in shared)
