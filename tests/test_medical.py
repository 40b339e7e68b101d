"""Medical task: the four hospitals, leak-free preprocessing, example-level
DP-SGD accounting, and the SavedModel that scores raw patient records."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from conftest import call_train, load_json

MED = ["--task=medical", "--model_dim=16", "--heads=2", "--layers=1", "--ff_dim=32", "--batch_size=16",
       "--local_steps=3", "--client_learning_rate=0.1", "--server_optimizer=sgdm", "--server_learning_rate=1.0"]


@pytest.fixture(scope="module")
def medical():
    from tasks import medical

    return medical


def test_four_hospitals_stratified_split(medical):
    clients = medical.load(seed=0)
    sizes = {c["name"]: len(c["train"][1]) + len(c["test"][1]) for c in clients}
    assert sizes == {"Cleveland": 304, "Hungary": 293, "Switzerland": 123, "VA Long Beach": 200}
    for c in clients:
        (xtr, ytr), (xte, yte) = c["train"], c["test"]
        assert len(yte) == pytest.approx(0.25 * (len(ytr) + len(yte)), abs=1.5)
        assert abs(ytr.mean() - yte.mean()) < 0.06  # stratified
    assert [len(c["test"][1]) for c in medical.load(seed=0)] == [len(c["test"][1]) for c in clients]


def test_encoding_is_per_record_and_marks_missing(medical):
    rows = pd.DataFrame({
        "age": [63, 50], "trestbps": [145, 0], "chol": [0, np.nan], "thalch": [150, 120], "oldpeak": [2.3, np.nan],
        "ca": [np.nan, 1], "sex": ["Male", "Female"], "cp": ["typical angina", ""], "fbs": ["TRUE", None],
        "restecg": ["normal", "lv hypertrophy"], "exang": ["FALSE", "TRUE"], "slope": [None, "flat"],
        "thal": ["fixed defect", "unknown-value"]})
    x = medical.encode(rows)
    n = medical.N_NUM
    names = list(medical.NUMERIC)
    assert x[0, names.index("age")] == pytest.approx((63 - 55) / 10)
    assert x[0, n + names.index("chol")] == 1 and x[1, n + names.index("trestbps")] == 1  # zero = missing
    assert x[1, n + names.index("oldpeak")] == 1 and x[0, n + names.index("ca")] == 1
    cats = list(medical.CATEGORICAL)
    assert x[1, 2 * n + cats.index("cp")] == 0 and x[0, 2 * n + cats.index("slope")] == 0
    assert x[1, 2 * n + cats.index("thal")] == 0 and x[0, 2 * n + cats.index("fbs")] == 2
    # No statistics of other records: each row encodes the same alone.
    np.testing.assert_array_equal(medical.encode(rows.iloc[1:]), x[1:])


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("med") / "run")
    # No noise flag: the medical task's default target ε = 10 (private by default).
    p = call_train(f"--output_dir={out}", "--rounds=3", "--eval_every=3", *MED)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_example_level_report_matches_dp_accounting(dp_run):
    out, p = dp_run
    r = load_json(os.path.join(out, "privacy_report.json"))
    assert r["unit_of_privacy"] == "example (record level)" and r["example_is"].startswith("a hospital visit; a patient only if")
    per = r["per_client"]
    assert {k: v["examples"] for k, v in per.items()} == {"Cleveland": 228, "Hungary": 220, "Switzerland": 92,
                                                           "VA Long Beach": 150}

    z = r["noise_multiplier"]
    assert r["noise_calibration"]["task_default"] and r["noise_calibration"]["target_epsilon"] == 10
    assert p.stdout.splitlines()[0] == ("privacy: aiming at ε = 10 (δ = 1e-05) over 3 rounds (the medical task's "
                                        "default; set --target_epsilon or --noise_multiplier to choose, "
                                        "--noise_multiplier=0 for no DP)")

    def eps(n):
        ev = dp_accounting.SelfComposedDpEvent(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(16 / n, dp_accounting.GaussianDpEvent(z)), 3), 3)
        return rdp.RdpAccountant().compose(ev).get_epsilon(1e-5)

    for v in per.values():
        assert v["epsilon"] == pytest.approx(eps(v["examples"]), rel=1e-9)
    assert r["epsilon"] == pytest.approx(eps(92), rel=1e-9) == max(v["epsilon"] for v in per.values())
    assert r["epsilon"] <= 10 and eps(92) > 9.99
    assert "at the example level" in r["statement"] and "3 steps per round" in r["statement"]
    summary = load_json(os.path.join(out, "operator", "summary.json"))
    assert "accuracy" in summary["eval_by_client"]["Switzerland"] and "test_accuracy" in summary["eval"]


SERVE = """
import json, sys
import numpy as np, tensorflow as tf
f = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
rows = json.loads(sys.argv[2])
feed = {k: tf.constant([np.nan if v is None else v for v in vals], tf.float32) if k in json.loads(sys.argv[3])
        else tf.constant(["" if v is None else v for v in vals]) for k, vals in rows.items()}
print(json.dumps(f(**feed)["probability"].numpy().tolist()))
"""


def test_saved_model_scores_raw_records_like_keras(dp_run, medical):
    out, _ = dp_run
    raw = {"age": [63, 41], "trestbps": [145, None], "chol": [233, 0], "thalch": [150, 172], "oldpeak": [2.3, None],
           "ca": [0, None], "sex": ["Male", "Female"], "cp": ["typical angina", "atypical angina"],
           "fbs": ["TRUE", None], "restecg": ["lv hypertrophy", "normal"], "exang": ["FALSE", "FALSE"],
           "slope": ["downsloping", None], "thal": ["fixed defect", None]}
    p = subprocess.run([sys.executable, "-c", SERVE, os.path.join(out, "saved_model"), json.dumps(raw),
                        json.dumps(list(medical.NUMERIC))], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    served = np.array(json.loads(p.stdout.strip().splitlines()[-1]))
    import tensorflow as tf

    cfg = load_json(os.path.join(out, "config.json"))["config"]
    model = medical.ft_transformer(cfg["model_dim"], cfg["heads"], cfg["layers"], cfg["ff_dim"])
    model.load_weights(os.path.join(out, "final_weights.h5"))
    expected = tf.sigmoid(model(medical.encode(pd.DataFrame(raw)))).numpy()[:, 0]
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert ((served > 0) & (served < 1)).all()


def test_client_level_on_four_hospitals_says_what_it_means(tmp_path):
    p = call_train(f"--output_dir={tmp_path / 'c'}", "--privacy_unit=client", "--clients_per_round=4",
                   "--sampling=fixed", "--noise_multiplier=0.3", "--rounds=1", *MED)
    assert p.returncode == 0, p.stderr[-3000:]
    r = load_json(os.path.join(tmp_path / "c", "privacy_report.json"))
    assert r["unit_of_privacy"] == "client (user level)" and r["sampling"]["population"] == 4
    assert r["small_population_warning"].startswith("Only 4 clients") and "--privacy_unit=example" in r["statement"]
    # Fixed-size cohorts of all 4: replace-one, no sampling. A client moves the clipped sum by 2C and its
    # clipped-count bit by 1, so the Gaussian's multiplier relative to the sensitivity is z/2 = 0.15 and one round
    # has RDP(α) = α/(2·0.15²); converted to (ε, δ) over a fine grid of α (test_privacy._rdp_to_dp).
    from test_privacy import _rdp_to_dp

    golden = _rdp_to_dp(lambda a: a / (2 * 0.15**2), 1e-5)
    assert r["event_noise_multiplier"] == pytest.approx(0.15) and r["neighbouring_relation"] == "replace one client"
    assert golden <= r["epsilon"] + 1e-9 and r["epsilon"] == pytest.approx(golden, rel=0.01)
    assert r["zcdp_rho"] == pytest.approx(1 / (2 * 0.15**2))


@pytest.mark.parametrize("rows_per_record, clip", [(1, 1e6), (2, 1e-3)])
def test_equal_rate_client_work_divides_by_q_times_the_clients_records(medical, rows_per_record, clip):
    """--example_sampling_rate: q is the same in every client and the noisy sum is divided by q × that client's
    records. At q = 1 with no noise, one step moves the weights by lr × the mean over records of each record's
    clipped gradient; a record of several rows (traffic's blocks) is clipped as one: the gradient of its rows'
    mean loss."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from tff_pipeline import dp_fedavg, dp_sgd, runtime
    from tff_pipeline.config import make

    import tasks

    runtime.install_context()
    cfg = make(task="medical", medical_model="logistic", privacy_unit="example", example_sampling_rate=1.0)
    task = tasks.build(cfg)
    work = dp_sgd.build_client_work(dp_fedavg.model_fn_for(task), task.loss, learning_rate=0.5, l2_norm_clip=clip,
                                    noise_multiplier=0.0, local_steps=1, expected_batch_size=16, sampling_rate=1.0,
                                    rows_per_record=rows_per_record)
    keras_model = task.build_model()
    start = [(0.01 * np.arange(w.size).reshape(w.shape)).astype(np.float32) for w in keras_model.get_weights()]
    keras_model.set_weights(start)
    weights = tff.learning.models.ModelWeights(trainable=start, non_trainable=[])
    clients = [0, 2]  # Cleveland (228 training records) and Switzerland (92)
    out = work.next((), [weights] * 2, [task.client_dataset(i, 0) for i in clients])
    for i, res in zip(clients, out.result):
        x, y = next(iter(task.client_dataset(i, 0)))
        records = len(x) // rows_per_record
        total = [np.zeros(w.shape, np.float32) for w in start]
        for r in range(records):
            rows = slice(r * rows_per_record, (r + 1) * rows_per_record)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.keras.losses.binary_crossentropy(y[rows], keras_model(x[rows]),
                                                                          from_logits=True))
            g = [t.numpy() for t in tape.gradient(loss, keras_model.trainable_variables)]
            norm = np.sqrt(sum((t**2).sum() for t in g))
            total = [a + b * min(1.0, clip / norm) for a, b in zip(total, g)]
        for got, want in zip(res.update, total):
            np.testing.assert_allclose(got, 0.5 * want / records, rtol=1e-4, atol=1e-7)


def test_an_empty_dp_sgd_batch_is_a_step_of_noise_only(medical):
    """q so small that no record is drawn: the step adds only the noise (here none), and nothing fails."""
    import tensorflow_federated as tff

    from tff_pipeline import dp_fedavg, dp_sgd, runtime
    from tff_pipeline.config import make

    import tasks

    runtime.install_context()
    task = tasks.build(make(task="medical", medical_model="logistic", privacy_unit="example"))
    for rows in (1, 2):
        work = dp_sgd.build_client_work(dp_fedavg.model_fn_for(task), task.loss, learning_rate=0.5, l2_norm_clip=1.0,
                                        noise_multiplier=0.0, local_steps=2, expected_batch_size=16,
                                        sampling_rate=1e-9, rows_per_record=rows)
        start = [np.full(w.shape, 0.1, np.float32) for w in task.build_model().get_weights()]
        out = work.next((), [tff.learning.models.ModelWeights(trainable=start, non_trainable=[])],
                        [task.client_dataset(0, 0)])
        assert all(not np.any(u) for u in out.result[0].update)


@pytest.fixture(scope="module")
def equal_rate_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("med_eq") / "run")
    p = call_train(f"--output_dir={out}", "--rounds=2", "--eval_every=2", "--task=medical", "--medical_model=logistic",
                   "--example_sampling_rate=0.5", "--local_steps=2", "--target_epsilon=1", "--l2_norm_clip=1.0",
                   "--client_learning_rate=0.5", "--server_optimizer=sgdm", "--server_learning_rate=1.0",
                   "--server_momentum=0")
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


def test_equal_rate_gives_every_hospital_the_same_epsilon_by_dp_accounting(equal_rate_run):
    out, _ = equal_rate_run
    r = load_json(os.path.join(out, "privacy_report.json"))
    z, per = r["noise_multiplier"], r["per_client"]
    ev = dp_accounting.SelfComposedDpEvent(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z)), 2), 2)
    eps = rdp.RdpAccountant().compose(ev).get_epsilon(1e-5)
    assert {k: v["examples"] for k, v in per.items()} == {"Cleveland": 228, "Hungary": 220, "Switzerland": 92,
                                                           "VA Long Beach": 150}
    for v in per.values():
        assert v["q"] == 0.5 and v["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert r["epsilon"] == pytest.approx(eps, rel=1e-9) and 0.99 < eps <= 1
    # One step less noise would break the target: z is the smallest on the 1e-4 grid.
    ev2 = dp_accounting.SelfComposedDpEvent(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z - 1e-4)), 2), 2)
    assert rdp.RdpAccountant().compose(ev2).get_epsilon(1e-5) > 1
    assert "same probability q = 0.5 in every client" in r["statement"]
    assert r["epsilon_is"].startswith("every client's")
    md = open(os.path.join(out, "privacy_report.md")).read()
    assert "| Switzerland | 92 | 0.5 |" in md


def test_logistic_saved_model_scores_like_keras(equal_rate_run, medical):
    import tensorflow as tf

    out, _ = equal_rate_run
    raw = {"age": [63.0, 41.0], "trestbps": [145.0, np.nan], "chol": [233.0, 0.0], "thalch": [150.0, 172.0],
           "oldpeak": [2.3, np.nan], "ca": [0.0, np.nan], "sex": ["Male", "Female"],
           "cp": ["typical angina", "atypical angina"], "fbs": ["TRUE", ""], "restecg": ["lv hypertrophy", "normal"],
           "exang": ["FALSE", "FALSE"], "slope": ["downsloping", ""], "thal": ["fixed defect", ""]}
    f = tf.saved_model.load(os.path.join(out, "saved_model")).signatures["serving_default"]
    served = f(**{k: tf.constant(v) for k, v in raw.items()})["probability"].numpy()
    model = medical.logistic()
    model.load_weights(os.path.join(out, "final_weights.h5"))
    frame = pd.DataFrame({k: [None if v == "" else v for v in vals] for k, vals in raw.items()})
    expected = tf.sigmoid(model(medical.encode(frame))).numpy()[:, 0]
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert model.count_params() == 39
