"""The bookkeeping of a Push-T leaderboard row, kept apart from the runs so it can be tested on known inputs.

Two protocols answer "what is this policy's Push-T score":
- the Diffusion Policy paper's: during training, evaluate every checkpoint on the same 50 starting states and report
  the max and the mean of the last 10 evaluations (coverage, i.e. mean max-reward), averaged over 3 training seeds;
- LeRobot's: the final checkpoint on 500 episodes, mean max-reward and success (coverage > 0.95), with a 68% interval
  of the Beta posterior of the success rate under a uniform prior.
The seed sets are disjoint: a figure is never scored on the states it was selected on.
"""

from __future__ import annotations

import math

# name: (first seed, episodes); the training-time curve (selection) uses "paper_50"
SEED_SETS = {"paper_50": (100000, 50), "wide_200": (200000, 200), "lerobot_500": (300000, 500)}


def seeds(name: str) -> range:
    first, n = SEED_SETS[name]
    return range(first, first + n)


def check_disjoint(names: tuple[str, ...] | None = None) -> None:
    """Raise if two seed sets (all of them by default) share a starting state."""
    names = tuple(SEED_SETS) if names is None else names
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = set(seeds(a)) & set(seeds(b))
            if shared:
                raise ValueError(f"seed sets {a} and {b} share {len(shared)} starting states (e.g. {min(shared)})")


def curve_summary(curve: list[tuple[int, float]]) -> dict:
    """The paper's figures of one training run's evaluation curve [(step, score), ...]: the max and the mean of the
    last 10 evaluations (in step order; fewer than 10: all of them)."""
    values = [v for _, v in sorted(curve)]
    if not values:
        return {"max": math.nan, "mean_last10": math.nan, "evaluations": 0}
    last = values[-10:]
    return {"max": max(values), "mean_last10": sum(last) / len(last), "evaluations": len(values)}


def beta_interval(successes: int, episodes: int, mass: float = 0.68) -> tuple[float, float]:
    """The central `mass` interval of the success rate's posterior Beta(1 + s, 1 + n - s) (uniform prior)."""
    from scipy.stats import beta

    if not 0 <= successes <= episodes or episodes < 1:
        raise ValueError(f"need 0 <= successes <= episodes and episodes >= 1, got {successes} of {episodes}")
    tail = (1 - mass) / 2
    dist = beta(1 + successes, 1 + episodes - successes)
    return float(dist.ppf(tail)), float(dist.ppf(1 - tail))
