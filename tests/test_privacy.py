"""Accounting: golden numbers, sampler/event agreement, calibration, errors."""

import math

import numpy as np
import pytest

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from tff_pipeline import privacy, report
from tff_pipeline.privacy import PrivacyConfig, PrivacyConfigError


def test_golden_rdp_and_pld_poisson():
    # dp_accounting 0.4.3: Poisson-sampled Gaussian, q=0.01, z=1, 1000 rounds, δ=1e-5.
    cfg = PrivacyConfig(population=10_000, clients_per_round=100, noise_multiplier=1.0, delta=1e-5)
    eps, order = privacy.epsilon(cfg, 1000)
    assert eps == pytest.approx(2.1014, abs=1e-4)
    assert order > 1
    assert report.pld_epsilon(cfg, 1000) == pytest.approx(1.8282, abs=1e-3)


def test_epsilon_matches_independent_accountant():
    cfg = PrivacyConfig(1139, 20, 0.8, 1e-5)
    acc = rdp.RdpAccountant().compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(20 / 1139, dp_accounting.GaussianDpEvent(0.8)), 57))
    assert privacy.epsilon(cfg, 57)[0] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


def test_fixed_size_sampling_is_accounted_without_replacement():
    cfg = PrivacyConfig(1000, 20, 1.0, 1e-5, sampling="fixed")
    ev = privacy.round_event(cfg)
    assert isinstance(ev, dp_accounting.SampledWithoutReplacementDpEvent)
    assert (ev.source_dataset_size, ev.sample_size) == (1000, 20)
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(ev, 100))
    assert privacy.epsilon(cfg, 100)[0] == pytest.approx(acc.get_epsilon(1e-5))
    # Replace-one is a stronger relation than add/remove: ε is larger than Poisson's.
    assert privacy.epsilon(cfg, 100)[0] > privacy.epsilon(PrivacyConfig(1000, 20, 1.0, 1e-5), 100)[0]
    # The plan and the report carry the same event.
    r = report.build(cfg, rounds_run=100, rounds_planned=100, unit="u", stop_reason="x")
    assert r["event_noise_multiplier"] == 0.5 and "z/2 = 0.5" in r["statement"]


def test_sampler_agrees_with_the_event():
    cfg = PrivacyConfig(500, 25, 1.0, 1e-5)
    s = cfg.sampler()  # secret (the default)
    assert s.secret
    sizes = [len(s.sample(r)) for r in range(1, 401)]
    # Poisson: cohort sizes vary, mean q*N = 25, variance N q (1-q).
    assert len(set(sizes)) > 5
    assert np.mean(sizes) == pytest.approx(25, abs=1.0)
    assert np.var(sizes) == pytest.approx(500 * 0.05 * 0.95, rel=0.25)
    counts = np.bincount(np.concatenate([s.sample(r) for r in range(1, 401)]), minlength=500)
    assert counts.mean() == pytest.approx(400 * 0.05, rel=0.05)  # every client with probability q
    fixed = PrivacyConfig(500, 25, 1.0, 1e-5, sampling="fixed").sampler()
    for r in range(1, 20):
        ids = fixed.sample(r)
        assert len(ids) == 25 and len(set(ids.tolist())) == 25


def test_sampling_is_secret_by_default_and_public_only_when_asked():
    cfg = PrivacyConfig(500, 25, 1.0, 1e-5, sampling="fixed")
    # Secret: the same round drawn twice (or by two samplers) differs; nothing about it can be rebuilt.
    a, b = cfg.sampler(), cfg.sampler()
    assert not np.array_equal(a.sample(7), b.sample(7)) and not np.array_equal(a.sample(7), a.sample(7))
    # Opt-in research mode: reproducible from the seed, and it says it is not secret.
    pub = cfg.sampler(public_seed=3)
    assert not pub.secret
    np.testing.assert_array_equal(pub.sample(7), cfg.sampler(public_seed=3).sample(7))
    assert not np.array_equal(pub.sample(7), pub.sample(7, attempt=1))  # a re-run round draws afresh


# --- Fixed-size sampling from first principles ---------------------------------------------------------------
# Under replace-one (fixed-size cohorts), swapping one client for another moves the sum of clipped updates by up
# to 2C (‖u - u'‖ ≤ ‖u‖ + ‖u'‖ ≤ 2C) and the centred clipped-count bit (±1/2) by 1. The Gaussian noise has std
# z_u·C on the sum and σ_b on the count; relative to those sensitivities the multipliers are z_u/2 and σ_b, and
# combined (Andrew et al. 2021, Thm 1) 1/σ² = 4/z_u² + 1/σ_b² = 4(1/z_u² + 1/(2σ_b)²) = 4/z², i.e. σ = z/2.
# With every client in every round (m = N) there is no sampling: T rounds compose to RDP(α) = α·T/(2σ²).


def _rdp_to_dp(rdp_of_alpha, delta):
    """min over a fine grid of α of the conversion of Canonne, Kamath, Steinke 2020 (Prop. 12 of 2004.00010),
    written out here, not taken from dp_accounting."""
    best = math.inf
    for a in np.concatenate([np.linspace(1.02, 20, 20000), np.linspace(20, 2000, 20000)]):
        best = min(best, rdp_of_alpha(a) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return best


@pytest.mark.parametrize("z,rounds", [(2.9007, 30), (0.8, 30), (5.0, 100)])
def test_fixed_size_without_sampling_golden_from_first_principles(z, rounds):
    from scipy.stats import norm

    cfg = PrivacyConfig(21, 21, z, 1e-5, sampling="fixed", clipped_count_stddev=100.0)
    sigma = z / 2
    golden = _rdp_to_dp(lambda a: a * rounds / (2 * sigma**2), 1e-5)
    eps = privacy.epsilon(cfg, rounds)[0]
    # dp_accounting evaluates a finite set of orders: at or a little above the continuous minimum.
    assert golden <= eps + 1e-9 and eps == pytest.approx(golden, rel=0.01)
    # And it is an upper bound on the exact ε of the composed Gaussian (μ-GDP with μ = √T/σ; Dong et al. 2019).
    mu = math.sqrt(rounds) / sigma
    exact_delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert exact_delta <= 1e-5
    # zCDP: ρ = T/(2σ²).
    assert privacy.zcdp_rho(cfg, rounds) == pytest.approx(rounds / (2 * sigma**2))
    if (z, rounds) == (2.9007, 30):  # the review's case: 10.0 was reported, 24.0 is right
        assert eps == pytest.approx(24.0, abs=0.1)


def test_fixed_size_subsampled_uses_half_the_multiplier_under_replace_one():
    cfg = PrivacyConfig(1139, 20, 0.8, 1e-5, sampling="fixed")
    ev = privacy.round_event(cfg)
    assert isinstance(ev, dp_accounting.SampledWithoutReplacementDpEvent)
    assert (ev.source_dataset_size, ev.sample_size, ev.event.noise_multiplier) == (1139, 20, 0.4)
    by_hand = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE).compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
            1139, 20, dp_accounting.GaussianDpEvent(0.8 / 2)), 30)).get_epsilon(1e-5)
    eps = privacy.epsilon(cfg, 30)[0]
    assert eps == pytest.approx(by_hand, rel=1e-12)
    assert eps == pytest.approx(18.44, abs=0.01)  # keyboard, --sampling=fixed, z = 0.8, 30 rounds (2.78 before)
    # Sampling can only help: below the same rounds without sampling (m = N).
    no_sampling = _rdp_to_dp(lambda a: a * 30 / (2 * 0.4**2), 1e-5)
    assert eps < no_sampling
    # Calibration inherits it: the z found for a target gives at most that target, and about twice Poisson's z.
    z = privacy.calibrate_noise_multiplier(8.0, 30, 1139, 20, 1e-5, "fixed", 10.0)
    assert privacy.epsilon(PrivacyConfig(1139, 20, z, 1e-5, "fixed", 10.0), 30)[0] <= 8.0
    assert privacy.epsilon(PrivacyConfig(1139, 20, z - 1e-3, 1e-5, "fixed", 10.0), 30)[0] > 8.0


def test_known_sampling_epsilon_composes_plain_gaussians():
    cfg = PrivacyConfig(1139, 20, 0.8, 1e-5)
    golden = _rdp_to_dp(lambda a: a * 4 / (2 * 0.8**2), 1e-5)  # a client in 4 rounds, no amplification
    assert privacy.known_sampling_epsilon(cfg, 4) == pytest.approx(golden, rel=0.01)
    assert privacy.known_sampling_epsilon(cfg, 4) > privacy.epsilon(cfg, 30)[0]


def test_calibrated_noise_is_rounded_up():
    for target, rounds, n, m, sb in ((10, 30, 21, 21, 3.0), (1.0, 30, 1139, 20, None), (3.0, 100, 1139, 20, None)):
        z = privacy.calibrate_noise_multiplier(target, rounds, n, m, 1e-5, clipped_count_stddev=sb)
        assert z == round(z, 4)  # what is printed at 4 decimals is what is used
        assert privacy.epsilon(PrivacyConfig(n, m, z, 1e-5, clipped_count_stddev=sb), rounds)[0] <= target
        assert privacy.epsilon(PrivacyConfig(n, m, z - 1e-4, 1e-5, clipped_count_stddev=sb), rounds)[0] > target
    assert privacy.round_up(2.90071) == 2.9008 and privacy.round_up(2.9007) == 2.9007


def test_calibration_hits_target():
    z = privacy.calibrate_noise_multiplier(2.1014, 1000, 10_000, 100, 1e-5)
    assert z == pytest.approx(1.0, abs=2e-3)
    eps = privacy.epsilon(PrivacyConfig(10_000, 100, z, 1e-5), 1000)[0]
    assert eps <= 2.1014 and eps == pytest.approx(2.1014, abs=2e-3)


def test_adaptive_clipping_bound_names_the_fix():
    with pytest.raises(PrivacyConfigError, match=r"--noise_multiplier=1.0 is too large for adaptive clipping.*--clipped_count_stddev"):
        PrivacyConfig(1000, 10, 1.0, 1e-5)
    PrivacyConfig(1000, 10, 1.0, 1e-5, clipped_count_stddev=0.6)  # chosen on purpose: allowed
    assert privacy.update_noise_multiplier(PrivacyConfig(1000, 10, 1.0, 1e-5, clipped_count_stddev=0.6)) == \
        pytest.approx((1 - 1 / 1.44) ** -0.5)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(clients_per_round=2000), "--clients_per_round=2000 exceeds the population of 1000"),
    (dict(noise_multiplier=-1.0), "--noise_multiplier=-1.0 must be a finite number >= 0"),
    (dict(delta=1.0), "--delta=1.0 must be in"),
    (dict(sampling="uniform"), "--sampling='uniform' must be one of"),
])
def test_invalid_privacy_settings(kwargs, msg):
    base = dict(population=1000, clients_per_round=10, noise_multiplier=0.5, delta=1e-5)
    with pytest.raises(PrivacyConfigError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        PrivacyConfig(**{**base, **kwargs})


def test_no_noise_means_no_dp_in_report():
    cfg = PrivacyConfig(1000, 10, 0.0, 1e-5)
    r = report.build(cfg, rounds_run=5, rounds_planned=5, unit="u", stop_reason="done")
    assert r["differentially_private"] is False and r["epsilon"] is None
    assert r["statement"].startswith("No differential privacy")
    assert "**no**" in report.render_markdown(r)


def test_event_json_roundtrip_recomputes_epsilon():
    cfg = PrivacyConfig(1000, 50, 1.2, 1e-6)
    r = report.build(cfg, rounds_run=40, rounds_planned=100, unit="u", stop_reason="x")
    ev = privacy.event_from_json(r["recorded_event"])
    assert ev == privacy.training_event(cfg, 40)
    assert rdp.RdpAccountant().compose(ev).get_epsilon(1e-6) == pytest.approx(r["epsilon"])
    assert r["epsilon_pld"] < r["epsilon"]  # PLD is tighter than RDP here


def test_privacy_module_does_not_import_tff():
    import subprocess, sys
    code = "import sys; sys.path.insert(0, '.'); import tff_pipeline.privacy, tff_pipeline.report; " \
           "print('tensorflow_federated' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=__file__.rsplit('/tests', 1)[0])
    assert out.stdout.strip() == "False False", out.stderr


def test_calibrated_noise_too_large_for_adaptive_clipping_names_the_target():
    with pytest.raises(PrivacyConfigError, match=r"^--target_epsilon=0.3 over --rounds=300 needs noise multiplier "
                                                 r"3.9\d*, too large for adaptive clipping.*raise --target_epsilon$"):
        privacy.calibrate_noise_multiplier(0.3, 300, 1139, 20, 1e-5)
    # The search itself may pass through z > 2 σ_b: ε = 1 over 30 rounds needs z = 1.14 < 2.
    assert privacy.calibrate_noise_multiplier(1.0, 30, 1139, 20, 1e-5) == pytest.approx(1.1435, abs=1e-3)


def test_adaptive_clipping_fix_suggests_only_what_can_work():
    # 21 clients: no cohort of 51 exists, so only σ_b (or the target) is offered.
    with pytest.raises(PrivacyConfigError) as e:
        privacy.calibrate_noise_multiplier(10, 100, 21, 20, 1e-5)
    assert "--clipped_count_stddev to e.g." in str(e.value) and "--clients_per_round" not in str(e.value)
    # An explicit σ_b does not grow with the cohort: raising --clients_per_round would not help.
    with pytest.raises(PrivacyConfigError) as e:
        PrivacyConfig(1000, 10, 1.0, 1e-5, clipped_count_stddev=0.4)
    assert "--clients_per_round" not in str(e.value)
    with pytest.raises(PrivacyConfigError, match="raise --clients_per_round to at least 11"):
        PrivacyConfig(1000, 10, 1.0, 1e-5)


def test_dp_ftrl_accounting_matches_tensorflow_privacy_tree_restart():
    """DP-FTRL's run event (one SingleEpochTreeAggregationDpEvent per tree, composed) has the RDP of
    tensorflow-privacy's compute_rdp_tree_restart for the same trees, and ρ that of compute_zcdp_single_tree
    summed over trees (one participation per tree)."""
    from tensorflow_privacy.privacy.analysis import tree_aggregation_accountant as tpa

    from tff_pipeline.mechanisms import DPFTRL

    m = DPFTRL(1139, 20, 1.3, 1e-5)
    assert m.rounds_per_epoch == 56
    entries = m.planned_entries(130)
    assert m.tree_sizes(entries) == [56, 56, 18]
    orders = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0]
    got = rdp.RdpAccountant(orders, dp_accounting.NeighboringRelation.REPLACE_SPECIAL).compose(m.compose(entries))
    want = tpa.compute_rdp_tree_restart(1.3, [56, 56, 18], orders)
    np.testing.assert_allclose(got._rdp, want, rtol=1e-12)
    rho = sum(tpa.compute_zcdp_single_tree(1.3, n, 1, n) for n in (56, 56, 18))
    assert m.zcdp_rho(130) == pytest.approx(rho, rel=1e-12)
    # A single event over all trees would assume once across the epochs: it must not be what is composed.
    assert m.epsilon(130)[0] > m.epsilon_of(dp_accounting.SingleEpochTreeAggregationDpEvent(1.3, [56, 56, 18]))[0]
    # Calibration: the smallest z on the 1e-4 grid.
    z = privacy.calibrate(lambda z: DPFTRL(1139, 20, z, 1e-5), 130, 8.0, 1e-5)
    assert DPFTRL(1139, 20, z, 1e-5).epsilon(130)[0] <= 8 < DPFTRL(1139, 20, z - 1e-4, 1e-5).epsilon(130)[0]


def test_dp_ftrl_schedule_takes_each_client_at_most_once_per_tree():
    from tff_pipeline.mechanisms import DPFTRL

    m = DPFTRL(50, 8, 1.0, 1e-5)
    s = m.sampler()
    plans = [s.plan(r, 0, None) for r in range(1, 20)]
    assert [p.tree for p in plans][:8] == [0] * 6 + [1, 1] and [p.restart for p in plans][:7] == [True] + [False] * 5 + [True]
    for t in {p.tree for p in plans}:
        ids = np.concatenate([p.clients for p in plans if p.tree == t])
        assert len(ids) == len(set(ids.tolist()))
    # Resumed without lost rounds: the epoch goes on; with lost rounds: a new tree.
    saved = s.state()
    again = m.sampler()
    again.restore(saved, False, saved["tree"])
    assert again.plan(20, 0, None).tree == plans[-1].tree
    lost = m.sampler()
    lost.restore(saved, True, saved["tree"])
    p = lost.plan(20, 0, None)
    assert p.tree == saved["tree"] + 1 and p.restart
    # A plan the budget guard refuses is forgotten (train._round restores the state before it): a tree it
    # would have begun is begun again, with its restart, by the round that does run.
    fresh = m.sampler()
    for r in range(1, 7):
        fresh.plan(r, 0, None)
    before = fresh.state()
    refused = fresh.plan(7, 0, None)
    fresh.restore(before, False, None)
    again = fresh.plan(7, 0, None)
    assert refused.restart and again.restart and again.tree == refused.tree == 1


def test_every_registered_mechanism_is_a_choice_of_the_flag():
    from tff_pipeline import config, mechanisms

    assert set(config.MECHANISMS) == {"auto", *mechanisms.REGISTRY}
    for name, cls in mechanisms.REGISTRY.items():
        assert cls.name == name and cls.unit in ("client", "example") and cls.title
