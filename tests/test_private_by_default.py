"""Private by default, secret sampling, empty cohorts, and capabilities
refused before training: real runs of scripts/train.py on small data."""

import json
import os

import numpy as np
import pytest

from conftest import call_train, load_json
from test_cli_errors import _one_line_error
from test_durability import _csv
from tff_pipeline import privacy

TINY = ["--history=24", "--horizon=3", "--model_dim=16", "--heads=2", "--ff_dim=32", "--max_client_examples=16",
        "--batch_size=8", "--eval_every=100"]


@pytest.mark.parametrize("task,extra", [("medical", []), ("traffic", [])])
def test_audit_is_refused_before_training_where_there_is_none(tmp_path, task, extra):
    args = [f"--task={task}", "--audit", "--rounds=1", f"--output_dir={tmp_path / 'o'}", *extra]
    if task == "traffic":
        args += [f"--traffic_data={_csv(tmp_path / 'd.csv')}", *TINY]
    p = call_train(*args)
    assert _one_line_error(p) == (f"error: --audit: task {task!r} has no membership-inference audit at the "
                                  f"{'client' if extra or task == 'traffic' else 'example'} level (only keyboard at "
                                  f"--privacy_unit=client has one); run without --audit")
    assert not os.path.exists(tmp_path / "o" / "config.json") and "round " not in p.stdout


def _empty_cohort_case(d):
    cfg = privacy.PrivacyConfig(3, 1, 0.5, 1e-5, clipped_count_stddev=1.0)
    seed = next(s for s in range(1000) if len(cfg.sampler(public_seed=s).sample(1)) == 0)
    args = ["--task=traffic", f"--traffic_data={_csv(d / 'e.csv')}", f"--output_dir={d / 'empty'}",
            "--clients_per_round=1", "--noise_multiplier=0.5", "--clipped_count_stddev=1",
            f"--public_sampling_seed={seed}", "--checkpoint_every=1", *TINY]
    return cfg, args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs, in this process one after another (no TensorFlow import each): the same command twice (same
    --seed, no privacy flag; 3 sensors, q = 2/3), and a public-seed run whose first cohort is empty."""
    d = tmp_path_factory.mktemp("secret")
    data = _csv(d / "d.csv")
    cmds = {name: ["--task=traffic", f"--traffic_data={data}", f"--output_dir={d / name}", "--rounds=6",
                   "--clients_per_round=2", "--clipped_count_stddev=2", "--seed=5", *TINY] for name in ("a", "b")}
    cfg, empty_args = _empty_cohort_case(d)
    cmds["empty"] = [*empty_args, "--rounds=2"]
    out = {}
    for k, args in cmds.items():
        p = call_train(*args)
        assert p.returncode == 0, p.stderr[-3000:]
        out[k] = (d / k, p.stdout)
    out["empty_case"] = (cfg, empty_args)
    return out


@pytest.fixture(scope="module")
def two_default_runs(runs):
    return [runs["a"], runs["b"]]


def _participation(out):
    with open(out / "operator" / "participation.jsonl") as f:
        return [json.loads(line) for line in f]


def test_default_run_is_private_at_the_tasks_target(two_default_runs):
    out, p = two_default_runs[0]
    r = load_json(out / "privacy_report.json")
    cfg = load_json(out / "config.json")
    assert cfg["config"]["noise_multiplier"] is None and cfg["config"]["target_epsilon"] == 10
    assert r["differentially_private"] and r["epsilon"] <= 10 and r["noise_calibration"]["task_default"]
    assert "the task's default target ε = 10" in r["statement"]
    assert p.splitlines()[0].startswith("privacy: aiming at ε = 10 (δ = 1e-05) over 6 rounds (the traffic")


def test_same_seed_draws_different_secret_cohorts_and_releases_none(two_default_runs):
    (a, _), (b, _) = two_default_runs
    pa, pb = _participation(a), _participation(b)
    assert len(pa) == len(pb) == 6
    # P(all six cohorts equal by chance) = (125/729)^6 < 3e-5.
    assert [x["clients"] for x in pa] != [x["clients"] for x in pb]
    for out in (a, b):
        import pandas as pd

        m = pd.read_csv(out / "operator" / "metrics.csv")
        assert list(m["cohort_size"]) == [len(x["clients"]) for x in _participation(out)]
        # Released files: no cohorts, no sampling key; the ledger holds events only.
        for e in (json.loads(line) for line in open(out / "ledger.jsonl")):
            assert set(e) == {"round", "attempt", "event"}
            assert privacy.event_from_json(e["event"]) == privacy.round_event(_pcfg(out))
        cfg = load_json(out / "config.json")
        assert cfg["config"]["public_sampling_seed"] is None and "data" not in cfg
        r = load_json(out / "privacy_report.json")
        assert r["sampling_secret"] and "secret operating-system randomness" in r["statement"]
        assert "cohort" not in json.dumps(r["recorded_event"])
        assert oct(os.stat(out / "operator").st_mode & 0o777) == "0o700"


def _pcfg(out):
    return privacy.PrivacyConfig(**load_json(out / "config.json")["privacy"])


def test_an_empty_poisson_cohort_is_a_round_and_resumes(runs):
    out, stdout = runs["empty"]
    cfg, args = runs["empty_case"]
    assert "clients   0" in [l for l in stdout.splitlines() if l.startswith("round    1/2")][0]
    p = call_train(*args, "--rounds=3")  # resumes from round 2
    assert p.returncode == 0, p.stderr[-3000:]
    assert "from the checkpoint of round 2" in p.stdout
    r = load_json(out / "privacy_report.json")
    part = _participation(out)
    assert [x["clients"] for x in part][0] == [] and r["rounds_accounted"] == 3 == len(part)
    assert r["epsilon"] == pytest.approx(privacy.epsilon(cfg, 3)[0])
    # Public sampling is opt-in and the report says what it costs: no amplification against who knows the seed.
    kmax = max(np.bincount([c for x in part for c in x["clients"]], minlength=3))
    assert not r["sampling_secret"] and r["max_participations"] == kmax
    assert r["epsilon_known_sampling"] == pytest.approx(privacy.known_sampling_epsilon(cfg, int(kmax)))
    assert "NOT secret" in r["statement"] and "--public_sampling_seed" in r["statement"]


def test_resuming_a_run_made_before_secret_sampling_is_refused():
    from tff_pipeline import train
    from tff_pipeline.config import ConfigError, make

    cfg = make()
    old = {"config": {k: v for k, v in cfg.to_json().items() if k != "public_sampling_seed"}}
    with pytest.raises(ConfigError, match=r"cannot resume x: it was made by an earlier version, which drew its "
                                          r"cohorts from --seed \(not secret\)"):
        train.check_resume_compatible(cfg, old, None, "x")
    assert "metrics.csv" in train.RUN_FILES and "privacy_report.png" in train.RUN_FILES  # --overwrite removes them
