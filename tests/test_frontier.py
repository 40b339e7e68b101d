"""The frontier command end to end on a tiny traffic config: two points (ε 8
and no DP), each a real training run with its own privacy report, the
central ceiling, and the table, CSV and plot."""

import csv
import math
import os

from conftest import load_json, run_script


def _csv(path):
    import numpy as np
    import pandas as pd

    n = 600
    idx = pd.date_range("2024-01-01", periods=n, freq="h", name="timestamp")
    t = np.arange(n)
    pd.DataFrame({s: 150 + 30 * np.sin(2 * np.pi * t / 24 + k) for k, s in enumerate("abc")}, index=idx).to_csv(path)
    return str(path)


def test_two_point_frontier_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "fr"
    flags = ["--task=traffic", f"--traffic_data={_csv(tmp_path / 'd.csv')}", "--history=24", "--horizon=3",
             "--rounds=2", "--clients_per_round=3", "--clipped_count_stddev=1", "--model_dim=16", "--heads=2",
             "--ff_dim=32", "--max_client_examples=16", "--batch_size=8", "--eval_every=100", "--epsilons=8,inf",
             "--seeds=0", f"--output_dir={out}"]
    p = run_script("frontier.py", *flags, "--central_epochs=1", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    rows = list(csv.DictReader(open(out / "frontier.csv")))
    assert [r["target_epsilon"] for r in rows] == ["8.0", "inf"]
    dp, nodp = rows
    # Each point is a real run whose report states the ε the table gives.
    rep = load_json(os.path.join(out, "eps-8-seed-0", "privacy_report.json"))
    assert float(dp["epsilon_rdp"]) == rep["epsilon"] <= 8 and float(dp["noise_multiplier"]) > 0
    assert float(nodp["noise_multiplier"]) == 0 and math.isinf(float(nodp["epsilon_rdp"]))
    assert float(dp["test_h1_mae"]) > 0 and float(nodp["test_h1_mae"]) > 0
    # config.json says how to rerun the point alone (its argv is the frontier's).
    conf = load_json(os.path.join(out, "eps-8-seed-0", "config.json"))
    cmd = dict(a[2:].split("=", 1) for a in conf["train_command"][1:])
    assert conf["train_command"][0] == "scripts/train.py" and cmd["target_epsilon"] == "8.0"
    assert cmd["seed"] == "0" and cmd["output_dir"] == os.path.join(str(out), "eps-8-seed-0")
    assert "frontier.py" in conf["command"][0]
    md = open(out / "frontier.md").read()
    assert "| target ε |" in md and "central ceiling (no DP)" in md and "persistence_h1_mae" in md
    assert open(out / "frontier.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "pre-training" not in p.stdout and "central ceiling: epoch 1/1" in p.stdout
    # The same command again reads both finished points instead of training them again.
    again = run_script("frontier.py", *flags, "--central_epochs=0", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("with these settings; reading it") == 2
    assert list(csv.DictReader(open(out / "frontier.csv"))) == rows


def test_a_point_whose_last_round_was_signalled_counts_as_finished(tmp_path):
    """A signal in a point's last round: the run completed every round (summary.json says so beside
    "interrupted"), so the next frontier command reads the point instead of trying to resume a finished run."""
    import json

    from tff_pipeline import frontier

    out = tmp_path / "p"
    (out / "operator").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"config": {"seed": 0, "rounds": 2}}))
    summary = {"interrupted": True, "stop_reason": "completed all planned rounds"}
    (out / "operator" / "summary.json").write_text(json.dumps(summary))
    assert frontier.finished(str(out), ["--seed=0", "--rounds=2"])
    summary["stop_reason"] = "interrupted by SIGTERM after round 1"
    (out / "operator" / "summary.json").write_text(json.dumps(summary))
    assert not frontier.finished(str(out), ["--seed=0", "--rounds=2"])
    assert not frontier.finished(str(out), ["--seed=1", "--rounds=2"])
