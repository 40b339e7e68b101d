"""What a TensorFlow user expects around a run (issue 19): TensorBoard events that say what metrics.csv says, an
on-device model.tflite that agrees with the SavedModel, and progress on the console in every phase."""

import csv
import io
import json
import os
import sys
import time

import numpy as np
import pytest

from conftest import load_json, run_script


def _events(logdir):
    """{tag: {step: value}} of every scalar in the event files under logdir, read with TensorFlow's own reader."""
    import tensorflow as tf

    out = {}
    for name in sorted(os.listdir(logdir)):
        for ev in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(v.tag, {})[ev.step] = float(tf.make_ndarray(v.tensor))
                elif v.metadata.plugin_data.plugin_name == "text":
                    out.setdefault(v.tag, {})[ev.step] = tf.make_ndarray(v.tensor).item().decode()
    return out


def test_tensorboard_events_say_what_metrics_csv_says(trained_run):
    d = trained_run["dir"]
    ev = _events(os.path.join(d, "operator", "tensorboard"))
    with open(os.path.join(d, "operator", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        r = int(row["round"])
        assert ev["train/loss"][r] == pytest.approx(float(row["train_loss"]), rel=1e-6)
        assert ev["privacy/epsilon_rdp"][r] == pytest.approx(float(row["epsilon"]), rel=1e-6)
        if row["eval_test_top1_accuracy"]:
            assert ev["eval/test_top1_accuracy"][r] == pytest.approx(float(row["eval_test_top1_accuracy"]), rel=1e-6)
        else:
            assert r not in ev["eval/test_top1_accuracy"]
        if r:
            assert ev["round/clip_norm"][r] == pytest.approx(float(row["clip_norm"]), rel=1e-6)
            assert ev["round/cohort_size"][r] == int(row["cohort_size"])
            assert ev["round/seconds"][r] == pytest.approx(float(row["seconds"]), rel=1e-3)
            if float(row["train_signal_norm_estimate"]) > 0:  # (the estimate is 0 when the noise explains it all)
                assert ev["round/noise_to_signal"][r] == pytest.approx(
                    float(row["train_expected_noise_norm"]) / float(row["train_signal_norm_estimate"]), rel=1e-5)
            else:
                assert r not in ev.get("round/noise_to_signal", {})
    assert sorted(ev["train/loss"]) == [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    # The PLD ε of the last round is the report's; the pre-training curve and the config are there too.
    rep = load_json(os.path.join(d, "privacy_report.json"))
    assert ev["privacy/epsilon_pld"][3] == pytest.approx(rep["epsilon_pld"], rel=1e-6)  # stored as float32
    assert sorted(ev["pretrain/loss"]) == [1]
    assert '"rounds": 3' in ev["config"][0]


def test_resumed_run_drops_the_events_of_rounds_trained_again(tmp_path):
    import tensorflow as tf

    from tff_pipeline.callbacks import _truncate_events

    w = tf.summary.create_file_writer(str(tmp_path))
    with w.as_default():
        tf.summary.text("config", "x", step=0)
        for step in range(6):
            tf.summary.scalar("train/loss", float(step), step=step)
    w.close()
    _truncate_events(str(tmp_path), 3)
    ev = _events(str(tmp_path))
    assert ev["train/loss"] == {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0} and ev["config"] == {0: "x"}


def test_tflite_in_a_fresh_process_agrees_with_the_saved_model(trained_run):
    d = trained_run["dir"]
    assert open(os.path.join(d, "vocab.txt")).read() == open(os.path.join(d, "saved_model", "assets", "vocab.txt")).read()
    p = run_script("tflite_check.py", f"--run_dir={d}", "--examples=400", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["calls_compared"] == 400 and res["top3_agreement"] >= 0.99, res
    # The run's own check (operator/tflite.json, in the training process) says the same.
    own = load_json(os.path.join(d, "operator", "tflite.json"))
    assert own["exported"] and own["quantization"] == "float16" and own["top3_agreement"] >= 0.99
    assert own["bytes"] == os.path.getsize(os.path.join(d, "model.tflite")) and own["seconds_per_call_median"] > 0
    assert "model.tflite: " in trained_run["stdout"] and "TFLite:         " in trained_run["stdout"]


def test_tflite_int8_is_smaller_and_close_and_medical_names_the_blocking_ops(keyboard_task):
    import tasks
    from tff_pipeline import config, tflite

    model = keyboard_task.build_model()
    module = keyboard_task.serving_module(model)
    f16, i8 = tflite.convert(module, "float16"), tflite.convert(module, "int8")
    assert len(i8) < 0.7 * len(f16)
    ex, labels = keyboard_task.device_examples(100)
    res = tflite.check(i8, module, ex, labels, latency_calls=3)
    assert res["calls_compared"] == 100 and res["top1_agreement"] >= 0.8
    # Medical's runs skip the conversion and say why in the converter's words: they are the converter's words.
    medical = tasks.build(config.make(task="medical"))
    with pytest.raises(tflite.Unsupported, match=r"no TensorFlow Lite builtin kernel for .*tf\.StringLower") as e:
        tflite.convert(medical.serving_module(medical.build_model()), "float16")
    assert str(e.value) == medical.tflite_unsupported


def test_console_shows_a_silent_phase_and_counts_loops(capsys):
    from tff_pipeline import progress

    lines = []
    with progress.Console(lines.append, tty=False, every=0.2):
        with progress.phase("exporting"):
            time.sleep(0.9)  # nothing of ours reports here: the watchdog speaks
        with progress.phase("evaluating"):
            for i in range(1, 6):
                progress.report(i, 5, "batches")
                time.sleep(0.25)
    still = [l for l in lines if l.startswith("exporting ... still running")]
    assert len(still) >= 2, lines
    counted = [l for l in lines if l.startswith("evaluating: ")]
    assert counted and all("/5 batches" in l for l in counted), lines
    # On a terminal the count is one bar line rewritten in place.
    with progress.Console(lambda line: print(line), tty=True, every=10):
        with progress.phase("pre-training"):
            for i in range(1, 4):
                progress.report(i, 3, "batches")
    out = capsys.readouterr().out
    assert "\r\x1b[Kpre-training: 3/3 batches (100%) [########################]" in out
    # Without a console (library use) reporting is a no-op.
    progress.report(1, 2)
