"""Traffic loaders on small files the tests write: DCRNN-style HDF5, CSV,
and the real defects (duplicates, gaps, late sensors) plus bad input."""

import numpy as np
import pandas as pd
import pytest

from tasks import traffic
from tff_pipeline.task import TaskError


def _frame(n=400, sensors=("s1", "s2"), freq="5min"):
    idx = pd.date_range("2024-01-01", periods=n, freq=freq)
    t = np.arange(n)
    return pd.DataFrame({s: 50 + 10 * np.sin(2 * np.pi * t / 288 + k) for k, s in enumerate(sensors)}, index=idx)


def test_hdf5_dcrnn_layout_zero_is_missing(tmp_path):
    df = _frame()
    df.iloc[10, 0] = 0.0
    df.to_hdf(tmp_path / "metr.h5", key="df")
    frame, info = traffic.load_file(str(tmp_path / "metr.h5"))
    assert info["zero_is_missing"] and np.isnan(frame.iloc[10, 0]) and list(frame.columns) == ["s1", "s2"]
    reg, rep = traffic.regularise(frame)
    assert rep["step"] == str(pd.Timedelta("5min")) and rep["missing_steps_added"] == 0


def test_csv_with_duplicates_and_gaps(tmp_path):
    df = _frame(freq="h")
    df = pd.concat([df.iloc[:100], df.iloc[99:100], df.iloc[105:]])  # one duplicate, 5 missing hours
    df.index.name = "timestamp"
    df.to_csv(tmp_path / "t.csv")
    frame, info = traffic.load_file(str(tmp_path / "t.csv"))
    reg, rep = traffic.regularise(frame)
    assert rep["duplicate_timestamps_averaged"] == 1 and rep["missing_steps_added"] == 5 and len(reg) == 400
    assert reg.iloc[100:105].isna().all().all()


def test_windows_split_by_time_and_normalised_per_window():
    v = np.arange(100, dtype=float)
    v[50] = np.nan
    starts = traffic.valid_starts(v, 10, 3, 0, 80)
    assert starts.max() + 10 + 3 <= 80  # training targets end before the cut
    assert not any(s + 10 <= 50 < s + 13 for s in starts)  # no window with a missing target
    test = traffic.valid_starts(v, 10, 3, 80, 100)
    assert test.min() + 10 >= 80
    tf_ = np.zeros((100, 4), np.float32)
    x, y, mu, sd = traffic.make_windows(v, tf_, np.array([0]), 10, 3)
    assert mu[0] == pytest.approx(4.5) and x[0, :, 0].mean() == pytest.approx(0, abs=1e-6)
    np.testing.assert_allclose(y[0] * sd[0] + mu[0], [10, 11, 12], rtol=1e-6)


def test_the_embedded_auckland_data_has_its_known_defects():
    frame, _ = traffic.load_akl()
    reg, rep = traffic.regularise(frame)
    assert len(reg.columns) == 21 and rep["duplicate_timestamps_averaged"] == 6 and rep["missing_steps_added"] >= 7


@pytest.mark.parametrize("name, content, expected", [
    ("x.csv", "time,a\nnot-a-time,1\n", "first column 'time' must be timestamps; cannot read 'not-a-time'"),
    ("x.csv", "time,a\n2024-01-01 00:00,1\n2024-01-01 01:00,abc\n", "sensor 'a' has a non-numeric value 'abc'"),
    ("x.txt", "hello", "unknown file type '.txt'"),
])
def test_bad_files_are_named(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskError, match=expected):
        traffic.load_file(str(tmp_path / name))


def test_missing_file_and_empty_sensor(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        traffic.load_file(str(tmp_path / "nope.h5"))
    df = _frame(freq="h")
    df["dead"] = np.nan
    with pytest.raises(TaskError, match="sensor 'dead' has no values at all"):
        traffic.regularise(df)


def test_train_on_a_user_csv_and_serve_in_original_units(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import call_train, load_json

    df = _frame(n=600, sensors=("a", "b", "c"), freq="h") * 3
    df.index.name = "timestamp"
    df.to_csv(tmp_path / "mine.csv")
    out = tmp_path / "run"
    p = call_train("--task=traffic", f"--traffic_data={tmp_path / 'mine.csv'}", f"--output_dir={out}",
                   "--history=24", "--horizon=3", "--rounds=2", "--clients_per_round=3", "--noise_multiplier=0",
                   "--model_dim=16", "--heads=2", "--ff_dim=32", "--max_client_examples=16", "--batch_size=8")
    assert p.returncode == 0, p.stderr[-3000:]
    # No DP only when asked for, and said at the start as well as in the report.
    assert p.stdout.startswith("privacy: NONE. --noise_multiplier=0 trains WITHOUT differential privacy")
    assert load_json(out / "privacy_report.json")["statement"].startswith("No differential privacy")
    s = load_json(out / "operator" / "summary.json")
    assert set(s["eval"]) >= {"test_h1_mae", "test_h3_rmse"} and "h1_wape" in s["eval_by_client"]["a"]
    rows = (out / "operator" / "heldout_by_client.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["client", "h1_mae"] and [r.split(",")[0] for r in rows[1:]] == ["a", "b", "c"]
    assert float(rows[1].split(",")[1]) == pytest.approx(s["eval_by_client"]["a"]["h1_mae"], rel=1e-5)
    assert set(s["baselines"]["baselines_this_split"]) >= {"persistence_h1_mae", "pooled_ridge_h3_wape"}
    header = rows[0].split(",")
    assert {"baseline_persistence_h1_mae", "baseline_pooled_ridge_h3_mae"} <= set(header)
    col = header.index("baseline_persistence_h1_mae")
    assert float(rows[2].split(",")[col]) == pytest.approx(
        s["baselines"]["baselines_by_client"]["b"]["persistence_h1_mae"], rel=1e-5)
    r = load_json(out / "privacy_report.json")
    assert r["sampling"]["population"] == 3 and r["small_population_warning"].startswith("Only 3 clients")
    hist = df["a"].to_numpy()[:24].astype(np.float32)
    hist[5] = np.nan
    hours = df.index[:24].hour.to_numpy().astype(np.float32)
    dows = df.index[:24].dayofweek.to_numpy().astype(np.int32)
    code = ("import json,sys,numpy as np,tensorflow as tf\n"
            "f=tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
            "h,hr,dw=(np.array(json.loads(a), dtype=float) for a in sys.argv[2:5])\n"
            "print(json.dumps(f(history=tf.constant([h],tf.float32),hour_of_day=tf.constant([hr],tf.float32),"
            "day_of_week=tf.constant([dw.astype(np.int32)],tf.int32))['forecast'].numpy().tolist()))")
    q = subprocess.run([sys.executable, "-c", code, str(out / "saved_model"),
                        json.dumps([None if np.isnan(v) else float(v) for v in hist]), json.dumps(hours.tolist()),
                        json.dumps(dows.tolist())], capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    served = np.array(json.loads(q.stdout.strip().splitlines()[-1]))[0]
    cfg = load_json(out / "config.json")["config"]
    model = traffic.forecaster(24, 3, cfg["model_dim"], cfg["heads"], cfg["layers"], cfg["ff_dim"], cfg["patch_len"])
    model.load_weights(os.path.join(out, "final_weights.h5"))
    idx = df.index[:27]
    x, _, mu, sd = traffic.make_windows(np.r_[hist, np.zeros(3)].astype(float), traffic.time_features(idx),
                                        np.array([0]), 24, 3)
    np.testing.assert_allclose(served, model(x).numpy()[0] * sd[0] + mu[0], rtol=1e-4, atol=1e-3)


def test_untrained_forecaster_is_the_seasonal_naive_forecast():
    """Round 0 forecasts "same step one season ago" (or the last value when
    the history is shorter than a season), from the calendar alone."""
    H, K = 16, 3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, H, traffic.N_FEAT)).astype(np.float32)
    seasonal = traffic.forecaster(H, K, 8, 2, 1, 16, patch_len=5, season=12)
    np.testing.assert_allclose(seasonal(x).numpy(), x[:, [4, 5, 6], 0], atol=1e-6)
    persistence = traffic.forecaster(H, K, 8, 2, 1, 16, patch_len=4, season=100)
    np.testing.assert_allclose(persistence(x).numpy(), np.repeat(x[:, -1:, 0], K, 1), atol=1e-6)


def test_pooled_ridge_baseline_learns_a_linear_series():
    """The ridge baseline is a real fit: on a noiseless weekly pattern it
    forecasts the test span almost exactly, unlike persistence."""
    idx = pd.date_range("2024-01-01", periods=24 * 7 * 8, freq="h")
    pattern = 100 + 50 * np.sin(2 * np.pi * idx.hour / 24) + 20 * (idx.dayofweek >= 5)
    v = pattern.to_numpy(float)
    tfeat = traffic.time_features(idx)
    cut = int(0.8 * len(v))
    tr = traffic.valid_starts(v, 168, 24, 0, cut)
    te = traffic.valid_starts(v, 168, 24, cut, len(v))
    predict = traffic.fit_ridge([v], tfeat, [tr], 168, 24)
    pred = predict(v, te)
    true = v[te[:, None] + 168 + np.arange(24)]
    assert np.abs(pred[:, 0] - true[:, 0]).mean() < 0.5 and np.abs(pred[:, 23] - true[:, 23]).mean() < 0.5
    assert np.isnan(pred[:, 5]).all()  # only h1 and hK are fitted
    assert np.abs(v[te + 167] - true[:, 0]).mean() > 5  # persistence is far off


def _record_sensors(frame, **kw):
    from tff_pipeline.config import make

    cfg = make(**{**dict(task="traffic", privacy_unit="example", example_sampling_rate=0.5, history=48, horizon=12,
                         record_days=4, windows_per_record=3), **kw})
    return traffic._Sensors(frame, cfg)


def _hourly(n=24 * 60, sensors=("a", "b", "c"), start="2024-01-01 05:00"):
    idx = pd.date_range(start, periods=n, freq="h")
    rng = np.random.default_rng(3)
    data = {s: 100 + 50 * np.sin(2 * np.pi * np.arange(n) / 24 + k) + rng.normal(0, 5, n) for k, s in
            enumerate(sensors)}
    frame = pd.DataFrame(data, index=idx)
    frame.iloc[300:340, 1] = np.nan  # a gap in sensor b
    return frame


def test_record_blocks_start_at_midnight_and_hold_their_windows_whole():
    d = _record_sensors(_hourly())
    L, H, K = d.record_steps, d.H, d.K
    assert L == 96 and d.block0 == 19 and d.index[d.block0].hour == 0  # the first midnight
    for blocks in d.records:
        for b, starts in blocks:
            lo = d.block0 + b * L
            assert d.index[lo].hour == 0 and len(starts)
            assert (starts >= lo).all() and (starts + H + K <= lo + L).all()  # history and targets in the block
            assert starts.max() + H + K <= d.cut  # training windows end before the test cut
    # every calendar day lies in one block: block boundaries are midnights
    assert all(d.index[d.block0 + k * L].hour == 0 for k in range(len(d.records[0])))


def test_one_block_changes_only_its_own_record_rows():
    """The contribution bound: change every count of one block of sensor a (and blank part of it): the rows the
    other blocks contribute are unchanged, whatever windows the changed block now has."""
    frame = _hourly()
    d = _record_sensors(frame)
    b, starts = d.records[0][3]
    lo = d.block0 + b * d.record_steps
    changed = frame.copy()
    changed.iloc[lo : lo + d.record_steps, 0] *= 3
    changed.iloc[lo + 10 : lo + 30, 0] = np.nan
    d2 = _record_sensors(changed)
    m = 3
    x1, y1 = next(iter(d.record_dataset(0, round_seed=11)))
    x2, y2 = next(iter(d2.record_dataset(0, round_seed=11)))
    assert x1.shape == x2.shape and x1.shape[0] == m * len(d.records[0])
    rows = slice(3 * m, 4 * m)
    keep = np.ones(x1.shape[0], bool)
    keep[rows] = False
    np.testing.assert_array_equal(x1.numpy()[keep], x2.numpy()[keep])
    np.testing.assert_array_equal(y1.numpy()[keep], y2.numpy()[keep])
    assert not np.array_equal(y1.numpy()[rows], y2.numpy()[rows])
    # other sensors are untouched
    np.testing.assert_array_equal(next(iter(d.record_dataset(1, 11)))[0].numpy(),
                                  next(iter(d2.record_dataset(1, 11)))[0].numpy())


def test_a_record_block_shorter_than_a_window_is_refused():
    with pytest.raises(TaskError, match=r"^--record_days=4 gives record blocks of 96 steps, shorter than one window "
                                        r"\(--history=96 \+ --horizon=12\); use --record_days=5 or more$"):
        _record_sensors(_hourly(), history=96)


def test_tuning_period_is_set_apart_from_training_and_a_tuning_run_stays_inside_it():
    frame = _hourly()
    prod = _record_sensors(frame, tuning_until="2024-01-21")
    until = prod.tuning_until
    assert prod.index[until] == pd.Timestamp("2024-01-21")
    for blocks, starts in zip(prod.records, prod.train_starts):
        assert all(prod.block0 + b * prod.record_steps >= until for b, _ in blocks)
        assert (starts >= until).all()
    assert "were set apart by a fixed public rule (--tuning_until=2024-01-21)" in traffic.tuning_text(prod)
    tune = _record_sensors(frame, tuning_until="2024-01-21", tuning_run=True)
    lo, hi = tune.index.get_loc(tune.tuning_validation[0]), tune.index.get_loc(tune.tuning_validation[1]) + 1
    assert hi == until and lo < hi
    for blocks, starts, test in zip(tune.records, tune.train_starts, tune.test_starts):
        assert all(tune.block0 + (b + 1) * tune.record_steps <= lo for b, _ in blocks) and blocks
        assert (starts + tune.H + tune.K <= lo).all()
        assert len(test) and (test + tune.H >= lo).all() and (test + tune.H + tune.K <= hi).all()
    assert traffic.tuning_text(tune).startswith("This is a tuning run (--tuning_run)")
    with pytest.raises(TaskError, match="^--tuning_until=2023-01-01: must lie after the first record block"):
        _record_sensors(frame, tuning_until="2023-01-01")
