"""The audit's statistics on synthetic scores with known answers, and a real
audit of the session's trained run."""

import json
import math
import os

import numpy as np
import pytest

from tff_pipeline import audit


def test_auc_and_advantage_known_values():
    assert audit.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert audit.auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert audit.auc([1, 1], [1, 1]) == 0.5
    mi = audit.membership_inference(np.array([3.0, 4, 5, 6]), np.array([0.0, 1, 2, 3.5]), 1e-5)
    assert mi["auc"] == pytest.approx(15 / 16) and mi["advantage"] == pytest.approx(0.75)


def test_no_signal_proves_nothing():
    rng = np.random.default_rng(0)
    lbs = [audit.epsilon_lower_bound(rng.normal(size=500), rng.normal(size=500), 1e-5, seed=s) for s in range(5)]
    assert max(lbs) < 0.3


def test_perfect_separation_proves_a_bounded_epsilon():
    # 1000 vs 1000 perfectly separated: the bound is positive but limited by the sample size
    # (Clopper-Pearson: FPR upper bound ~ 3.7/500 on the held-out half).
    lb = audit.epsilon_lower_bound(np.arange(1000) + 2000.0, np.arange(1000.0), 1e-5)
    assert 4.0 < lb < math.log(500)


def test_exposure_of_an_extreme_and_a_typical_canary():
    ref = np.random.default_rng(1).normal(50, 3, 5000)
    top = audit.exposure(20.0, ref, 60.0)
    assert top["rank"] == 1 and top["exposure_rank"] == pytest.approx(math.log2(5001))
    assert top["exposure_extrapolated"] > 20
    mid = audit.exposure(50.0, ref, 60.0)
    assert 0.5 < mid["exposure_rank"] < 1.5 and mid["exposure_extrapolated"] < 2
