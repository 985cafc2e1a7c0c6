"""The benchmarks' statistics: the interval of a median and the verdicts that rest on it."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import fp32_flops_per_cycle, measured_clock_ghz, median_ci, verdict  # noqa: E402


def _coverage(n: int, k: int) -> float:
    """Exact coverage of [x_(k), x_(n+1-k)] for the median of any continuous distribution."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 9, 11, 15, 30])
def test_median_ci_picks_the_narrowest_interval_with_95_percent_coverage(n):
    xs = list(range(n))
    random.Random(n).shuffle(xs)
    mid, lo, hi = median_ci(xs)
    assert mid == (n - 1) / 2
    k = int(lo) + 1  # values are 0..n-1, so x_(k) = k - 1
    assert hi == n - k  # symmetric order statistics
    if n >= 6:
        assert _coverage(n, k) >= 0.95
        if k + 1 <= n // 2:
            assert _coverage(n, k + 1) < 0.95  # one step narrower would not cover 95%
    else:
        assert (lo, hi) == (0, n - 1)  # too few values: the full range


def test_median_ci_covers_the_true_median_about_95_percent_of_the_time():
    rng = random.Random(0)
    trials, hits = 2000, 0
    for _ in range(trials):
        # Skewed noise, as on a shared machine: exponential, median log 2.
        _, lo, hi = median_ci([rng.expovariate(1.0) for _ in range(11)])
        hits += lo <= math.log(2) <= hi
    assert hits / trials >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / trials)


def test_median_ci_rejects_no_values():
    with pytest.raises(ValueError, match="at least one"):
        median_ci([])


@pytest.mark.parametrize(
    ("lo", "hi", "below", "expected"),
    [
        (-0.02, 0.005, True, "met"),  # all of [lo, hi] < 1%
        (0.011, 0.03, True, "not met"),
        (-0.01, 0.02, True, "within noise"),
        (0.76, 0.9, False, "met"),  # all of [lo, hi] >= 75%
        (0.5, 0.74, False, "not met"),
        (0.7, 0.8, False, "within noise"),
    ],
)
def test_verdict_needs_the_whole_interval_on_one_side(lo, hi, below, expected):
    target = 0.01 if below else 0.75
    assert verdict(lo, hi, target, below=below) == expected


def test_fma_ceiling_inputs_are_plausible():
    fpc, how = fp32_flops_per_cycle()
    assert fpc in (16, 32, 64) and how
    ghz, how = measured_clock_ghz(repeats=3, iters=1_000_000)
    assert 0.2 < ghz < 7.0, how


def test_train_step_rounds_options(capsys):
    # More rounds narrow the intervals behind the roofline and overhead verdicts; the report
    # names them in its command line, and fewer than 3 are refused before anything runs.
    import train_step

    with pytest.raises(SystemExit):
        train_step.main(["--quick", "--rounds", "2"])
    assert "--rounds must be >= 3" in capsys.readouterr().err
    assert (
        train_step.main(["--quick", "--threads", "1", "--rounds", "4", "--heun-rounds", "3"]) == 0
    )
    out = capsys.readouterr().out
    assert "--threads 1 --rounds 4 --heun-rounds 3`" in out
    assert "4 rounds; in each" in out and "per-round ratio, 3 rounds" in out


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sampling_model_only_loop_replays_the_samplers_calls(cfg):
    # The reference loop replays the model calls of one recorded sampler run; the recording
    # must hold exactly nfe(method, steps) calls (run() raises otherwise), guided or not.
    import sampling

    rows = sampling.run(model_name="SiT-XS/4", batch=2, steps=3, repeats=1, cfg_scale=cfg)
    assert [(r["method"], r["nfe"]) for r in rows] == [
        ("euler", 3), ("heun", 5), ("euler_maruyama", 3)
    ]  # fmt: skip
    assert all(r["model_ms_per_image"][0] > 0 for r in rows)


def test_train_overhead_times_the_term_alone_only_in_side_rounds(tmp_path):
    # The term's second run (timed alone, on a copy) evicts what the rest of its step reads, in
    # the dispersive arm only: the steps compared must come from rounds without it.
    import json

    import train_overhead

    r = train_overhead.measure(
        "fmnist", rounds=4, block=5, log_every_measured=5, side_every=2, raw=tmp_path / "f.json"
    )
    raw = json.loads((tmp_path / "f.json").read_text())
    assert (r["rounds"], r["side_rounds"]) == (2, 2)
    assert [len(raw["samples"][n]) for n in ("baseline", "dispersive")] == [2, 2]
    assert len(raw["term_cpu"]) == 2 * 5  # every step of the side rounds, none of the others
    assert [len(raw["stats_cpu"][n]) for n in ("baseline", "dispersive")] == [2, 2]
    assert all(len(rnd) == 5 for rnd in raw["samples"]["dispersive"])
    assert 0 < r["term_alone"]["share"] < 1 and r["cpu"]["arms"]["baseline"]["n_plain"] == 8
    with pytest.raises(ValueError, match="no side or no clean round"):
        train_overhead.measure("fmnist", rounds=1, block=5, log_every_measured=5, side_every=2)
