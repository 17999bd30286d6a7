"""The leaderboard's bookkeeping (evaluation/policy_scores.py) on known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.policy_scores import SEED_SETS, beta_interval, check_disjoint, curve_summary, seeds


def test_the_beta_interval_is_the_posteriors_central_mass():
    """Against the Beta posterior's CDF by numerical integration of its density (no scipy on this side)."""
    s, n = 434, 500
    lo, hi = beta_interval(s, n)
    x = np.linspace(0, 1, 2_000_001)
    log_pdf = s * np.log(np.clip(x, 1e-300, None)) + (n - s) * np.log(np.clip(1 - x, 1e-300, None))
    pdf = np.exp(log_pdf - log_pdf.max())
    cdf = np.cumsum(pdf) / pdf.sum()
    assert np.interp(lo, x, cdf) == pytest.approx(0.16, abs=2e-4) and np.interp(hi, x, cdf) == pytest.approx(0.84, abs=2e-4)
    assert lo < s / n < hi
    lo0, hi0 = beta_interval(0, 10)
    # no success in 10: Beta(1, 11), whose CDF is 1 - (1 - x)^11 in closed form
    assert lo0 == pytest.approx(1 - 0.84 ** (1 / 11), rel=1e-9) and hi0 == pytest.approx(1 - 0.16 ** (1 / 11), rel=1e-9)
    with pytest.raises(ValueError):
        beta_interval(11, 10)


def test_max_and_mean_of_the_last_ten_on_a_synthetic_curve():
    curve = [(step, 0.1 * k) for k, step in enumerate(range(1000, 13000, 1000))]  # 12 evaluations: 0.0 .. 1.1
    shuffled = curve[::-1]
    got = curve_summary(shuffled)  # order by step, whatever order the log gave
    assert got["evaluations"] == 12 and got["max"] == pytest.approx(1.1)
    assert got["mean_last10"] == pytest.approx(np.mean([0.1 * k for k in range(2, 12)]))
    short = curve_summary(curve[:4])
    assert short["mean_last10"] == pytest.approx(np.mean([0.0, 0.1, 0.2, 0.3])) and short["evaluations"] == 4
    assert math.isnan(curve_summary([])["max"])


def test_the_seed_sets_are_disjoint_and_the_right_sizes():
    check_disjoint()
    assert {k: len(seeds(k)) for k in SEED_SETS} == {"paper_50": 50, "wide_200": 200, "lerobot_500": 500}
    SEED_SETS["overlap"] = (100040, 20)
    try:
        with pytest.raises(ValueError, match="paper_50 and overlap share 10 starting states"):
            check_disjoint()
    finally:
        del SEED_SETS["overlap"]


def test_the_leaderboard_writes_both_protocols_into_its_markdown_row():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("leaderboard", Path(__file__).parents[1] / "benchmarks" / "leaderboard.py")
    board = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(board)
    row = {"label": "Diffusion Policy, CNN (DDIM-10)", "max": 0.9123, "mean_last10": 0.8801, "lerobot_reward": 0.95,
           "lerobot_success": 0.6, "lerobot_success_interval": beta_interval(300, 500), "wide_200_reward": 0.93,
           "wide_200_success": 0.41, "nfe": 10, "latency_per_chunk_s": 0.051, "parameters": 4_560_000, "max_steps": 8000,
           "train_wall_s": 1980.0, "published_max_mean": (0.95, 0.91)}
    table = board.markdown({"dp_c": row}).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[2].count("|") == 13
    lo, hi = beta_interval(300, 500)
    assert f"| 0.912 | 0.880 | 0.950 | 0.600 [{lo:.3f}, {hi:.3f}] | 0.930 / 0.41 | 10 | 51.0 | 4.56M | 8000 | 33 | 0.95/0.91 |" in table[2]
