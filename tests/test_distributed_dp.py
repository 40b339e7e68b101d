"""--mechanism=distributed_dp: the clients add discrete Gaussian noise and the server sees only the secure sum.
Each round is accounted as the Gaussian whose RDP bounds the distributed discrete Gaussian's (Kairouz, Liu, Steinke
2021, Prop. 14), with the rounding's inflation of the sensitivity and no amplification by sampling."""

import math

import numpy as np
import pytest

import dp_accounting
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from conftest import call_train, load_json, run_script
from tff_pipeline.mechanisms import DistributedDDG


def _gaussian_epsilon(z, rounds, delta):
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    return acc.compose(dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(z), rounds)).get_epsilon(delta)


@pytest.mark.parametrize("m, z, bits, dim", [(4, 2.0, 20, 38), (200, 1.0, 20, 76896), (200, 1.0, 16, 76896),
                                             (20, 3.0, 12, 5000), (50, 0.05, 20, 1000)])
def test_the_discrete_noise_never_claims_more_than_a_gaussian_of_the_same_variance(m, z, bits, dim):
    mech = DistributedDDG(1000, m, z, 1e-5, 0.1, bits, "hd", dim)
    assert mech.round_event() == dpe.GaussianDpEvent(mech.event_noise_multiplier)
    # z_eff = 1/(2Δ/(√m σ) + τ√d) with Δ = s·C + √d ≥ s·C: below the same-variance Gaussian's √m σ / (2 s C)
    assert mech.event_noise_multiplier < mech.gaussian_same_variance_multiplier
    assert mech.l2_bound >= mech.scale * 0.1 + math.sqrt(mech.padded_dim)
    eps, _ = mech.epsilon(30)
    assert eps >= _gaussian_epsilon(mech.gaussian_same_variance_multiplier, 30, 1e-5)
    assert eps == pytest.approx(_gaussian_epsilon(mech.event_noise_multiplier, 30, 1e-5), rel=1e-9)


def test_tau_counts_when_the_client_noise_is_coarse():
    """With a client noise scale near 1/2 the sum of discrete Gaussians is far from one: τ > 0 lowers z_eff."""
    mech = DistributedDDG(100, 10, 0.05, 1e-5, 0.1, 4, "hd", 16)
    assert 0.5 <= mech.noise_scale <= 2
    tau = 10 * sum(math.exp(-2 * math.pi**2 * mech.noise_scale**2 * k / (k + 1)) for k in range(1, 10))
    assert mech.tau == pytest.approx(tau) and tau > 1e-6
    no_tau = 1 / (2 * mech.l2_bound / (math.sqrt(10) * mech.noise_scale))
    assert mech.event_noise_multiplier < no_tau


def test_the_accounting_reads_what_tffs_factory_runs():
    """One secure, noisy aggregation of 4 clients by TFF's factory as the mechanism builds it: its measured scale,
    sensitivity bound, client noise stddev and padded dimension are the ones the accounting used, and the
    aggregation has no plaintext path."""
    import tensorflow_federated as tff

    from tff_pipeline import runtime

    runtime.install_context()
    mech = DistributedDDG(10, 4, 2.0, 1e-5, 0.1, 20, "hd", 38)
    process = mech.sum_factory().create(tff.types.to_type([(np.float32, [37]), (np.float32, [1])]))
    tff.test.assert_contains_secure_aggregation(process.next)
    tff.test.assert_not_contains_unsecure_aggregation(process.next)
    rng = np.random.default_rng(0)
    values = [[rng.normal(size=37).astype(np.float32), rng.normal(size=1).astype(np.float32)] for _ in range(4)]
    out = process.next(process.initialize(), values)
    m = out.measurements
    assert int(m["padded_dim"]) == mech.padded_dim == 64 and int(m["actual_num_clients"]) == 4
    assert float(m["scale_factor"]) == pytest.approx(mech.scale, rel=1e-6)
    assert float(m["scaled_inflated_l2"]) == pytest.approx(mech.l2_bound, rel=1e-6)
    assert math.ceil(float(m["scaled_local_stddev"])) == mech.noise_scale
    total = sum(np.concatenate(v) * min(1.0, 0.1 / np.linalg.norm(np.concatenate(v))) for v in values)
    noise_sd = math.sqrt(4) * mech.noise_scale / mech.scale  # the sum's noise, unscaled
    resid = np.concatenate([np.ravel(x) for x in out.result]) - total
    assert np.abs(resid).max() < 6 * noise_sd and resid.std() > 0.5 * noise_sd  # the clipped sum, and the noise


def test_the_process_averages_the_noisy_sum_over_the_cohort():
    """The model update is the secure noisy sum divided by the securely counted cohort (an unweighted mean), as
    TFF's ddp_secure_aggregator builds it: with 4 identical clients and no noise, their common clipped update."""
    import tensorflow_federated as tff

    from tff_pipeline import runtime

    runtime.install_context()
    mech = DistributedDDG(10, 4, 0.0, 1e-5, 10.0, 20, "hd", 38)
    process = mech.aggregator().create(tff.types.to_type([(np.float32, [37]), (np.float32, [1])]))
    tff.test.assert_not_contains_unsecure_aggregation(process.next)
    value = [np.linspace(-1, 1, 37).astype(np.float32), np.array([0.5], np.float32)]
    out = process.next(process.initialize(), [value] * 4)
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in out.result]), np.concatenate(value), atol=1e-4)


def test_a_distributed_dp_run_reports_its_accounting(tmp_path):
    out = str(tmp_path / "ddp")
    p = run_script("train.py", "--task=medical", "--privacy_unit=client", "--medical_model=logistic",
                   "--mechanism=distributed_dp", "--sampling=fixed", "--clients_per_round=4", "--noise_multiplier=2",
                   "--rounds=2", "--eval_every=2", f"--output_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    r = load_json(f"{out}/privacy_report.json")
    d = r["distributed_dp"]
    assert r["mechanism_name"] == "distributed_dp" and r["secure_aggregation"]["enabled"] is True
    assert r["epsilon"] == pytest.approx(_gaussian_epsilon(d["event_noise_multiplier"], 2, 1e-5), rel=1e-9)
    assert d["event_noise_multiplier"] < d["gaussian_same_variance_multiplier"]
    assert "no party saw a noiseless update" in r["statement"] and "no amplification by sampling" in r["statement"]
    rows = open(f"{out}/operator/metrics.csv").read().splitlines()
    head = rows[0].split(",")
    assert {"train_ddp_scaled_inflated_l2", "train_ddp_actual_num_clients"} <= set(head) and len(rows) == 3
    first = dict(zip(head, rows[1].split(",")))
    assert float(first["train_ddp_scaled_inflated_l2"]) == pytest.approx(d["l2_sensitivity_scaled"], rel=1e-6)
    again = run_script("privacy_report.py", f"--run_dir={out}")  # ε re-derived from the recorded DpEvent alone
    assert again.returncode == 0 and "match" in again.stdout and "NO" not in again.stdout, again.stdout[-2000:]


@pytest.mark.parametrize("flags, words", [
    (["--sampling=poisson"], "--mechanism=distributed_dp needs --sampling=fixed"),
    (["--sampling=fixed", "--ddp_bits=1"], "--ddp_bits=1 is too few"),
    (["--sampling=fixed", "--ddp_rotation=fft"], "--ddp_rotation='fft' must be hd or dft"),
])
def test_distributed_dp_refuses_what_its_accounting_does_not_cover(tmp_path, flags, words):
    p = call_train("--task=medical", "--privacy_unit=client", "--medical_model=logistic", "--clients_per_round=4",
                   "--mechanism=distributed_dp", "--noise_multiplier=2", *flags, f"--output_dir={tmp_path / 'x'}")
    assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
