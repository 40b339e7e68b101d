"""FedAtt (tff_pipeline.fedatt, --aggregation=attentive): the aggregation factory's rule, its equality with
FedAvg's mean when every distance is equal, and its refusal under client-level DP."""

import collections

import numpy as np
import pytest


def _clients(rng, n, equal):
    base_a, base_b = rng.normal(size=5).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    out = []
    for i in range(n):
        if equal:  # the same norms per tensor: permuted, sign-flipped copies of one update
            a = rng.permutation(base_a) * np.float32(rng.choice([-1, 1]))
            b = -base_b if i % 2 else rng.permutation(base_b.ravel()).reshape(3, 2)
        else:
            a = rng.normal(size=5).astype(np.float32) * np.float32(1 + i)
            b = rng.normal(size=(3, 2)).astype(np.float32)
        out.append(collections.OrderedDict(a=a.astype(np.float32), b=b.astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def processes():
    import tensorflow_federated as tff

    from tff_pipeline import fedatt, runtime

    runtime.install_context()
    spec = tff.types.to_type(collections.OrderedDict(a=tff.TensorType(np.float32, [5]),
                                                     b=tff.TensorType(np.float32, [3, 2])))
    return (fedatt.build_factory(1.0).create(spec), fedatt.build_factory(0.5).create(spec),
            tff.aggregators.UnweightedMeanFactory().create(spec))


def test_with_equal_distances_fedatt_is_fedavgs_mean(processes):
    att, _, mean = processes
    clients = _clients(np.random.default_rng(0), 6, equal=True)
    out = att.next(att.initialize(), clients)
    want = mean.next(mean.initialize(), clients).result
    for k in ("a", "b"):
        np.testing.assert_allclose(out.result[k], want[k], rtol=1e-6, atol=1e-7)
    assert out.measurements["max_weight"] == pytest.approx(1 / 6)
    assert out.measurements["effective_clients"] == pytest.approx(6.0)


@pytest.mark.parametrize("which,temperature", [(0, 1.0), (1, 0.5)])
def test_each_tensor_is_a_softmax_over_the_clients_distances(processes, which, temperature):
    proc = processes[which]
    clients = _clients(np.random.default_rng(1), 4, equal=False)
    state = proc.initialize()
    assert state["temperature"] == pytest.approx(temperature)
    out = proc.next(state, clients)
    effective = []
    for k in ("a", "b"):
        s = np.array([np.linalg.norm(c[k]) for c in clients], np.float64)
        w = np.exp((s - s.max()) / temperature)
        w /= w.sum()
        np.testing.assert_allclose(out.result[k], sum(wi * c[k] for wi, c in zip(w, clients)), rtol=1e-5, atol=1e-6)
        effective.append(1 / np.sum(w ** 2))
    assert out.measurements["effective_clients"] == pytest.approx(np.mean(effective), rel=1e-5)
    # Large distances do not overflow: the exponent is at most 0.
    big = [collections.OrderedDict(a=c["a"] * np.float32(1e4), b=c["b"]) for c in clients]
    assert all(np.isfinite(v).all() for v in proc.next(state, big).result.values())


def test_fedatt_is_refused_with_client_level_dp_and_named_in_the_report():
    from tff_pipeline import mechanisms
    from tff_pipeline.config import make
    from tff_pipeline.mechanisms import PrivacyConfigError

    class Task:
        population, default_privacy_unit = 100, "client"

    for flags in ({"noise_multiplier": 1.0}, {"target_epsilon": 8.0}):
        with pytest.raises(PrivacyConfigError, match=r"--aggregation=attentive \(FedAtt\).*cannot be claimed.*"
                                                     r"--noise_multiplier=0"):
            mechanisms.resolve(make(task="keyboard", aggregation="attentive", **flags), Task)
    with pytest.raises(PrivacyConfigError, match="secure_aggregation hides"):
        mechanisms.resolve(make(task="keyboard", aggregation="attentive", noise_multiplier=0.0,
                                secure_aggregation=True), Task)
    with pytest.raises(PrivacyConfigError, match="--aggregation=attentive runs in the cohort round"):
        mechanisms.resolve(make(task="keyboard", aggregation="attentive", noise_multiplier=0.0,
                                mechanism="dp_sgd"), Task)
    mech = mechanisms.resolve(make(task="keyboard", aggregation="attentive", noise_multiplier=0.0), Task).mechanism
    from tff_pipeline import report

    r = report.build(mech, rounds_run=3, rounds_planned=3, unit="user", stop_reason="done")
    assert r["aggregation"]["rule"] == "attentive" and not r["differentially_private"]
    text = report.statement(r, mech)
    assert "No differential privacy" in text and "FedAtt" in text and "clipped updates" not in text


def test_reptile_is_refused_where_the_client_work_is_not_the_cohort_round():
    from tff_pipeline import mechanisms
    from tff_pipeline.config import ConfigError, make
    from tff_pipeline.mechanisms import PrivacyConfigError

    class Task:
        population, default_privacy_unit = 100, "example"

    with pytest.raises(PrivacyConfigError, match="--meta_learning=reptile .* this run's mechanism is dp_sgd"):
        mechanisms.resolve(make(task="medical", meta_learning="reptile", noise_multiplier=1.0), Task)
    with pytest.raises(ConfigError, match="--personalize_steps=0; set it to at least 1"):
        make(task="medical", meta_learning="reptile", personalize_steps=0)
