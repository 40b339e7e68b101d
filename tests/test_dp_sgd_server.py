"""--mechanism=dp_sgd_server: DP-SGD over every client's records with the noise added once by the server.
The clients send sums of clipped per-record gradients; the server adds N(0, (z·C)²) and divides by q × all
records; each round is one Poisson-sampled Gaussian for every record."""

import os

import numpy as np
import pytest

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from conftest import call_train, load_json


def _medical(**kw):
    import tasks
    from tff_pipeline.config import make

    cfg = make(task="medical", medical_model="logistic", mechanism="dp_sgd_server", local_steps=1, **kw)
    return cfg, tasks.build(cfg)


def test_one_round_moves_the_model_by_the_mean_clipped_gradient_over_every_clients_records():
    """q = 1, no noise, server SGD without momentum: the new weights are start − lr × (sum over every hospital's
    records of each record's clipped gradient) / (all records)."""
    import tensorflow as tf

    from tff_pipeline import mechanisms, runtime

    runtime.install_context()
    clip, lr = 0.5, 0.7
    cfg, task = _medical(example_sampling_rate=1.0, noise_multiplier=0.0, l2_norm_clip=clip, server_optimizer="sgdm",
                         server_learning_rate=lr, server_momentum=0.0)
    mech = mechanisms.resolve(cfg, task).mechanism
    assert mech.name == "dp_sgd_server" and mech.total_records == sum(task.example_counts) == 690
    process = mech.build_process(task, cfg)
    keras_model = task.build_model()
    start = [(0.01 * np.arange(w.size).reshape(w.shape)).astype(np.float32) for w in keras_model.get_weights()]
    keras_model.set_weights(start)
    state = process.initialize()
    state = process.set_model_weights(state, type(process.get_model_weights(state))(trainable=start, non_trainable=[]))
    out = process.next(state, [task.client_dataset(i, 0) for i in range(task.population)])
    total = [np.zeros(w.shape, np.float32) for w in start]
    for i in range(task.population):
        x, y = next(iter(task.client_dataset(i, 0)))
        for r in range(len(x)):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(y[r:r + 1], keras_model(x[r:r + 1]),
                                                                          from_logits=True))
            g = [t.numpy() for t in tape.gradient(loss, keras_model.trainable_variables)]
            norm = np.sqrt(sum((t**2).sum() for t in g))
            total = [a + b * min(1.0, clip / norm) for a, b in zip(total, g)]
    for got, s, t in zip(process.get_model_weights(out.state).trainable, start, total):
        np.testing.assert_allclose(got, s - lr * t / 690, rtol=1e-4, atol=1e-6)


def test_the_server_adds_one_gaussian_of_std_z_clip_over_the_expected_batch():
    """Clients that send zeros: the released mean is the server's noise alone, std z·C / (q × records)."""
    import tensorflow_federated as tff

    from tff_pipeline import dp_sgd, runtime

    runtime.install_context()
    value_type = tff.to_type((tff.TensorType(np.float32, [200, 100]), tff.TensorType(np.float32, [50])))
    agg = dp_sgd.server_gaussian_sum_factory(3.0, 12.0).create(value_type, tff.TensorType(np.float32))
    zeros = (np.zeros([200, 100], np.float32), np.zeros([50], np.float32))
    out = agg.next(agg.initialize(), [zeros] * 3, [1.0] * 3)
    noise = np.concatenate([np.ravel(t) for t in out.result])
    assert noise.std() == pytest.approx(3.0 / 12.0, rel=0.03) and abs(noise.mean()) < 0.01
    assert out.measurements["expected_noise_norm"] == pytest.approx(3.0 / 12.0 * np.sqrt(20050), rel=1e-6)
    again = agg.next(agg.initialize(), [zeros] * 3, [1.0] * 3)  # secret, fresh noise every call
    assert not np.allclose(again.result[1], out.result[1])


def test_settings_it_cannot_run_are_refused_in_one_line():
    from tff_pipeline import mechanisms

    for kw, words in (({"example_sampling_rate": 0.5, "local_steps": 2}, "--local_steps=2"),
                      ({}, "--example_sampling_rate")):
        kw = {"local_steps": 1, **kw}
        import tasks
        from tff_pipeline.config import make

        cfg = make(task="medical", medical_model="logistic", mechanism="dp_sgd_server", noise_multiplier=1.0, **kw)
        with pytest.raises(mechanisms.PrivacyConfigError, match=words):
            mechanisms.resolve(cfg, tasks.build(cfg))


@pytest.fixture(scope="module")
def server_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("server_noise") / "run")
    p = call_train(f"--output_dir={out}", "--rounds=3", "--eval_every=3", "--task=medical", "--medical_model=logistic",
                   "--mechanism=dp_sgd_server", "--example_sampling_rate=0.5", "--local_steps=1",
                   "--target_epsilon=1", "--l2_norm_clip=1.0", "--server_optimizer=sgdm",
                   "--server_learning_rate=0.5", "--server_momentum=0")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_report_states_the_event_dp_accounting_computes_and_the_trusted_server(server_run):
    r = load_json(os.path.join(server_run, "privacy_report.json"))
    z = r["noise_multiplier"]
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z)), 1), 3)
    eps = rdp.RdpAccountant().compose(event).get_epsilon(1e-5)
    assert r["epsilon"] == pytest.approx(eps, rel=1e-9) and 0.99 < eps <= 1
    assert all(v["epsilon"] == pytest.approx(eps, rel=1e-9) for v in r["per_client"].values())
    assert "the server adds Gaussian noise" in r["statement"] and "(q × 690 records)" in r["statement"]
    assert "not against the server itself" in r["statement"]


def test_a_client_that_samples_no_record_sends_zeros():
    """q so small that no record is drawn, with records of one and of two rows: the client's sum is zero, and
    nothing fails."""
    import tensorflow_federated as tff

    from tff_pipeline import dp_fedavg, dp_sgd, runtime

    runtime.install_context()
    _, task = _medical(example_sampling_rate=0.5, noise_multiplier=1.0)
    for rows in (1, 2):
        work = dp_sgd.build_clipped_sum_client_work(dp_fedavg.model_fn_for(task), task.loss, l2_norm_clip=1.0,
                                                    sampling_rate=1e-9, rows_per_record=rows)
        start = [np.full(w.shape, 0.1, np.float32) for w in task.build_model().get_weights()]
        out = work.next((), [tff.learning.models.ModelWeights(trainable=start, non_trainable=[])],
                        [task.client_dataset(0, 0)])
        assert all(not np.any(u) for u in out.result[0].update)
