"""Runs that survive faults: a real SIGKILL mid-run and resume with every
released round counted, SIGTERM, a second process on the same directory, a
file-size limit (a full disk) while checkpointing, and non-finite updates
from a bad client. All with real processes and real TFF rounds on a small
traffic CSV."""

import json
import os
import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from conftest import PY, ROOT, call_train, children_workers, load_json, run_script, worker_alive
from tff_pipeline import privacy


def _csv(path, bad_sensor=False):
    n = 600
    idx = pd.date_range("2024-01-01", periods=n, freq="h", name="timestamp")
    t = np.arange(n)
    df = pd.DataFrame({s: 150 + 30 * np.sin(2 * np.pi * t / 24 + k) for k, s in enumerate("abc")}, index=idx)
    if bad_sensor:  # a broken sensor emitting the largest float: its windows overflow to NaN
        df.iloc[100:130, 1] = 1e308
    df.to_csv(path)
    return str(path)


def _flags(tmp_path, out, **kw):
    flags = {"task": "traffic", "traffic_data": _csv(tmp_path / "data.csv"), "output_dir": out, "history": 24,
             "horizon": 3, "rounds": 8, "clients_per_round": 3, "noise_multiplier": 1.0, "clipped_count_stddev": 1,
             "model_dim": 16, "heads": 2, "ff_dim": 32, "max_client_examples": 16, "batch_size": 8,
             "checkpoint_every": 3, "eval_every": 100, **kw}
    return [f"--{k}={v}" for k, v in flags.items()]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """One finished 2-round run with a checkpoint per round, trained once for the tests that resume, refuse or
    overwrite it; each works on its own copy (copy_of)."""
    base = tmp_path_factory.mktemp("two_rounds")
    out = str(base / "run")
    args = _flags(base, out, rounds=2, checkpoint_every=1)
    p = call_train(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, str(base / "data.csv")


def copy_of(two_rounds, tmp_path):
    """A copy of the 2-round run in tmp_path (resuming may move a run to another --output_dir) and its flags."""
    src, csv = two_rounds
    out = str(tmp_path / "run")
    shutil.copytree(src, out, ignore=shutil.ignore_patterns(".lock"))
    return out, _flags(tmp_path, out, rounds=2, checkpoint_every=1, traffic_data=csv)


def _start(args):
    return subprocess.Popen([PY, os.path.join(ROOT, "scripts", "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for_line(proc, prefix, timeout=300):
    lines, t0 = [], time.monotonic()
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
        assert time.monotonic() - t0 < timeout, "".join(lines)[-3000:]
    raise AssertionError("process ended before " + prefix + ":\n" + "".join(lines)[-3000:])


def _ledger(out):
    with open(os.path.join(out, "ledger.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def _pcfg(out):
    p = load_json(os.path.join(out, "config.json"))["privacy"]
    return privacy.PrivacyConfig(p["population"], p["clients_per_round"], p["noise_multiplier"], p["delta"],
                                 p["sampling"], p["clipped_count_stddev"])


def test_sigkill_mid_run_then_resume_counts_every_released_round(tmp_path):
    out = str(tmp_path / "run")
    args = _flags(tmp_path, out)
    proc = _start(args)
    _wait_for_line(proc, "round    4/8")  # round 4 was shown; the last checkpoint is round 3
    workers = children_workers(proc.pid)
    assert workers, "the run has no TFF worker of its own"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # Its worker dies with it (PR_SET_PDEATHSIG), even though python could not clean up.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(worker_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if worker_alive(w)]
    released = len(_ledger(out))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert released >= 4 and ckpts[-1] == "ckpt-000003", (released, ckpts)
    eps_at_kill = privacy.epsilon(_pcfg(out), released)[0]

    p = call_train(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stdout and "from the checkpoint of round 3" in p.stdout
    s = load_json(os.path.join(out, "operator", "summary.json"))
    r = load_json(os.path.join(out, "privacy_report.json"))
    ledger = _ledger(out)
    # The model has exactly the planned rounds; the rounds lost in the kill (4..released) ran twice and count twice.
    assert s["rounds_run"] == 8 and r["rounds_run"] == 8
    assert len(ledger) == 8 + (released - 3) == r["rounds_accounted"] == s["rounds_accounted"]
    assert [e["round"] for e in ledger] == list(range(1, released + 1)) + list(range(4, 9))
    assert all(e["attempt"] == 1 for e in ledger[released:released + released - 3])
    eps_final = privacy.epsilon(_pcfg(out), len(ledger))[0]
    assert r["epsilon"] == pytest.approx(eps_final, rel=1e-9)
    assert r["epsilon"] > privacy.epsilon(_pcfg(out), 8)[0] and r["epsilon"] > eps_at_kill
    assert "run again" in r["statement"]
    m = pd.read_csv(os.path.join(out, "operator", "metrics.csv"))
    assert list(m["round"]) == list(range(1, 9))  # the lost rows were replaced, not duplicated
    print(f"kill-and-resume: ε at kill ({released} results) {eps_at_kill:.4f}; final ({len(ledger)} results for "
          f"8 rounds) {r['epsilon']:.4f}; an uninterrupted 8-round run: {privacy.epsilon(_pcfg(out), 8)[0]:.4f}")

    # Same command again: the run is complete and is left alone.
    before = os.path.getmtime(os.path.join(out, "privacy_report.json"))
    p = call_train(*args)
    assert p.returncode == 2 and "already holds a completed run of 8 rounds" in p.stderr
    assert os.path.getmtime(os.path.join(out, "privacy_report.json")) == before


def test_sigterm_stops_after_the_round_checkpoints_reports_and_a_second_process_is_refused(tmp_path):
    out = str(tmp_path / "run")
    args = _flags(tmp_path, out, rounds=200, checkpoint_every=500)
    proc = _start(args)
    _wait_for_line(proc, "round    2/200")
    second = run_script("train.py", *args, timeout=300)  # a process of its own: a regressed lock would run 200 rounds
    assert second.returncode == 2
    assert f"error: --output_dir={out} is in use by another run (pid {proc.pid})" in second.stderr
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=300) == 130, rest[-3000:]
    s = load_json(os.path.join(out, "operator", "summary.json"))
    r = load_json(os.path.join(out, "privacy_report.json"))
    done = s["rounds_run"]
    assert 2 <= done < 200 and s["interrupted"] and r["stop_reason"].startswith("interrupted by SIGTERM")
    assert os.listdir(os.path.join(out, "checkpoints")) == [f"ckpt-{done:06d}"]
    assert r["rounds_accounted"] == len(_ledger(out)) == done
    assert os.path.isdir(os.path.join(out, "saved_model"))


def test_resume_with_a_changed_privacy_flag_or_resume_false_is_refused(two_rounds, tmp_path):
    out, args = copy_of(two_rounds, tmp_path)
    files = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f != ".lock"}
    for extra, expected in [
        ("--noise_multiplier=1.5", f"error: cannot resume {out}: --noise_multiplier=1.5 differs from the run being "
                                   f"resumed (--noise_multiplier=1.0); the privacy accounting must describe one "
                                   f"mechanism for every round. Re-run with --noise_multiplier=1.0, or start a new "
                                   f"run in another --output_dir"),
        ("--delta=1e-6", f"error: cannot resume {out}: --delta=1e-06 differs from the run being resumed "
                         f"(--delta=1e-05)"),
        ("--clients_per_round=2", f"error: cannot resume {out}: --clients_per_round=2 differs"),
        ("--resume=false", f"error: --output_dir={out} holds an earlier run and --resume=false refuses to touch it; "
                           f"choose a new --output_dir, or drop --resume=false to continue that run"),
    ]:
        p = call_train(*args, "--rounds=4", extra)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert [l for l in p.stderr.splitlines() if l.startswith("error: ")][0].startswith(expected), p.stderr
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f != ".lock"} == files


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(two_rounds, tmp_path):
    out, args = copy_of(two_rounds, tmp_path)
    ckpt2 = os.path.join(out, "checkpoints", "ckpt-000002")
    state_before = open(os.path.join(ckpt2, "state.npz"), "rb").read()

    def small_files():  # a real OS limit: writes past 32 KB fail (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))

    p = subprocess.run([PY, os.path.join(ROOT, "scripts", "train.py"), *args, "--rounds=4"], capture_output=True,
                       text=True, cwd=ROOT, preexec_fn=small_files, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = [l for l in p.stderr.splitlines() if l.startswith("error: ")][0]
    assert line.startswith(f"error: cannot write the checkpoint of round 3 to {out}/checkpoints (File too large); "
                           f"the checkpoint of round 2 is intact. Free space and re-run the same command to resume")
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["ckpt-000001", "ckpt-000002"]
    assert open(os.path.join(ckpt2, "state.npz"), "rb").read() == state_before

    p = call_train(*args, "--rounds=4")  # room again: resumes from round 2
    assert p.returncode == 0, p.stderr[-3000:]
    r = load_json(os.path.join(out, "privacy_report.json"))
    # Round 3's first result was recorded (and shown) before its checkpoint failed: it counts.
    assert r["rounds_run"] == 4 and r["rounds_accounted"] == 5 == len(_ledger(out))


def test_a_bad_client_with_non_finite_updates_does_not_poison_the_model(tmp_path):
    out = str(tmp_path / "run")
    args = _flags(tmp_path, out, rounds=3, eval_every=1, max_client_examples=400)
    args[1] = f"--traffic_data={_csv(tmp_path / 'bad.csv', bad_sensor=True)}"
    p = call_train(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    m = pd.read_csv(os.path.join(out, "operator", "metrics.csv"))
    assert (m["train_non_finite_updates_zeroed"] == 1).all()  # sensor b, every round
    assert np.isfinite(m["eval_test_h1_mae"]).all() and np.isfinite(m["eval_a_h1_mae"]).all()
    import h5py

    with h5py.File(os.path.join(out, "final_weights.h5")) as f:
        arrays = []
        f.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays)


def test_overwrite_removes_the_earlier_run_only_after_the_new_one_checks_out(two_rounds, tmp_path):
    out, args = copy_of(two_rounds, tmp_path)
    files = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f != ".lock"}
    missing = str(tmp_path / "typo.csv")
    p = call_train(*args, "--overwrite", f"--traffic_data={missing}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: --traffic_data={missing}: no such file")
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f != ".lock"} == files
    p = call_train(*args, "--overwrite", "--rounds=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(_ledger(out)) == 1 and os.listdir(os.path.join(out, "checkpoints")) == ["ckpt-000001"]


def test_a_torn_last_ledger_line_stays_a_line_of_its_own(tmp_path):
    """A crash mid-append leaves a last line without its newline. Opening the ledger ends it, so the next round
    is not glued onto it: the rounds counted in memory (and put in a checkpoint) and those on disk agree."""
    from tff_pipeline import checkpoint

    (tmp_path / "ledger.jsonl").write_text('{"round": 1, "attempt": 0, "event": {}}\n{"round": 2, "att')
    ledger = checkpoint.Ledger(str(tmp_path))
    assert len(ledger) == 2 and ledger.entries[1]["torn"]
    ledger.append(2, {"event": {}})
    assert len(ledger) == 3 == len(checkpoint.Ledger(str(tmp_path)))
