"""Personalization (--personalize, scripts/personalize.py): each evaluation client fine-tunes the released model on
its own training part and is scored on its own held-out part. It changes neither the global model nor the privacy
report; its outputs are per client, finite, and zero-gain without steps; bad settings are one-line refusals."""

import contextlib
import csv
import hashlib
import io
import os
import types

import numpy as np
import pytest

from conftest import call_train, load_json, run_script

MED = ["--task=medical", "--model_dim=16", "--heads=2", "--layers=1", "--ff_dim=32", "--batch_size=16",
       "--local_steps=2", "--client_learning_rate=0.1", "--server_optimizer=sgdm", "--server_learning_rate=1.0",
       "--tflite=none", "--medical_model=logistic"]
HOSPITALS = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


@pytest.fixture(scope="module")
def med_run(tmp_path_factory):
    """A tiny medical run (the logistic model: the fastest to build), trained with --personalize (5 local steps per
    hospital)."""
    out = str(tmp_path_factory.mktemp("pers") / "run")
    p = call_train(f"--output_dir={out}", "--rounds=2", "--eval_every=2", "--personalize",
                   "--personalize_steps=5", *MED)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@pytest.fixture(scope="module")
def med_model(med_run):
    """The run's task and its final global model, rebuilt from the run directory as scripts/personalize.py does."""
    import tasks
    from tff_pipeline import rundir

    out, _ = med_run
    _, cfg = rundir.open_finished_run(out)
    task = tasks.build(cfg)
    return cfg, task, rundir.load_final_model(task, cfg, out)


def _digests(run_dir):
    """sha256 of every file outside operator/ (everything the guarantee covers, and the checkpoints)."""
    out = {}
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(root, d), run_dir) != "operator"]
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), run_dir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _by_client_csv(run_dir):
    with open(os.path.join(run_dir, "operator", "heldout_by_client.csv"), newline="") as f:
        return {r.pop("client"): r for r in csv.DictReader(f)}


def test_training_with_personalize_writes_it_and_says_it_changes_no_guarantee(med_run):
    out, p = med_run
    res = load_json(os.path.join(out, "operator", "personalization.json"))
    assert res["clients"] == HOSPITALS and res["settings"]["steps"] == 5
    assert os.path.getsize(os.path.join(out, "operator", "personalization.png")) > 1000
    assert "personalization (5 steps" in p.stdout and "operator-only" in p.stdout
    rows = _by_client_csv(out)
    assert set(rows) == set(HOSPITALS)
    for name, i in zip(HOSPITALS, range(4)):
        assert float(rows[name]["personalized_accuracy"]) == pytest.approx(res["personalized_metrics"]["accuracy"][i],
                                                                           abs=1e-5)
        # the "before" of personalization is the global model's held-out accuracy of this hospital
        assert float(rows[name]["accuracy"]) == pytest.approx(res["baseline_metrics"]["accuracy"][i], abs=1e-5)
    r = load_json(os.path.join(out, "privacy_report.json"))
    from tff_pipeline.rundir import PERSONALIZATION_NOT_COVERED, PERSONALIZATION_STATEMENT

    assert PERSONALIZATION_NOT_COVERED in r["releases"]["not_covered"]
    assert PERSONALIZATION_STATEMENT in r["releases"]["not_covered"]


def test_scripts_personalize_changes_neither_model_nor_report(med_run):
    out, _ = med_run
    before = _digests(out)
    assert {"privacy_report.json", "privacy_report.md", "final_weights.h5", "config.json"} <= set(before)
    p = run_script("personalize.py", f"--run_dir={out}", "--personalize_steps=3", "--personalize_layers=head",
                   timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _digests(out) == before  # byte for byte: the model, the report, the ledger, config.json, checkpoints
    res = load_json(os.path.join(out, "operator", "personalization.json"))
    assert res["settings"]["steps"] == 3 and res["settings"]["layers"] == "head"
    assert "the guarantee of the global model is unchanged" in p.stdout
    rows = _by_client_csv(out)  # the columns of this personalization replace the earlier ones
    assert float(rows["Cleveland"]["personalized_accuracy"]) == pytest.approx(
        res["personalized_metrics"]["accuracy"][0], abs=1e-5)


def test_per_client_outputs_and_zero_steps_zero_gain(med_model):
    from tff_pipeline import personalize

    cfg, task, model = med_model
    snapshot = [w.numpy().copy() for w in model.weights]
    res = personalize.personalize(task, model, personalize.Settings(steps=4, learning_rate=0.1, batch_size=16))
    assert res["clients"] == HOSPITALS
    for key in ("baseline_metrics", "personalized_metrics", "gain"):
        assert all(np.isfinite(v) for v in res[key]["accuracy"])
    assert res["personalized_metrics"]["accuracy"] != res["baseline_metrics"]["accuracy"] or any(
        res["gain"]["auc"])  # it trained
    s = res["summary"]
    assert s["improved"] + s["unchanged"] + s["worse"] == 4 and s["share_lose"] == s["worse"] / 4
    zero = personalize.personalize(task, model, personalize.Settings(steps=0, batch_size=16))
    assert zero["gain"]["accuracy"] == [0.0] * 4 and zero["gain"]["auc"] == [0.0] * 4
    assert zero["baseline_metrics"] == res["baseline_metrics"]  # every client starts from the global model again
    # the global model is bit-identical afterwards
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(snapshot, model.weights))
    cols = personalize.merge_by_client({"Cleveland": {"accuracy": 0.5, "personalized_accuracy": 9.0}}, res)
    assert cols["Cleveland"]["personalized_accuracy"] == res["personalized_metrics"]["accuracy"][0]
    assert cols["Cleveland"]["accuracy"] == 0.5 and "accuracy" in cols["Hungary"]  # a new row holds the global's
    val = personalize.personalize(task, model, personalize.Settings(steps=2, batch_size=16, validation=True))
    assert val["evaluated_on"] == "validation" and val["clients"] == HOSPITALS
    assert val["baseline_metrics"]["accuracy"] != res["baseline_metrics"]["accuracy"]  # not the held-out part


def test_the_copy_pairs_with_the_model_whatever_trains(med_model):
    """The copy that fine-tunes lists its weights as the global model does, also when the global model's nested
    layers train differently (adapters only) and for an attention model; a transformer's global model stays
    bit-identical too."""
    import tasks
    from tff_pipeline import adapters, models, personalize

    lm = models.causal_transformer_lm(50, 6, dim=8, heads=2, ff_dim=16, lora_rank=2)
    adapters.set_trainable(lm, "adapters")  # as in the federated rounds: Keras now lists the adapters first
    for w in lm.weights:
        w.assign(np.random.default_rng(len(w.name)).normal(size=w.shape).astype(w.dtype.as_numpy_dtype))
    clone, variables = personalize._clone(lm)
    for v, w in zip(variables, lm.weights):
        v.assign(w)
    x = np.random.default_rng(0).integers(0, 50, (3, 6)).astype(np.int32)
    np.testing.assert_array_equal(clone(x).numpy(), lm(x).numpy())  # the same model: every weight in its place
    for layers in ("all", "head", "adapters"):
        personalize._set_trainable(clone, layers, ("logits", "logits_adapter"), "keyboard")
        assert clone.trainable_weights
    assert {w.name.split("/")[0] for w in clone.trainable_weights} >= {"logits_adapter"}
    cfg, _, _ = med_model
    task = tasks.build(cfg.replace(medical_model="ft_transformer"))
    model = task.build_model()
    snapshot = [w.numpy().copy() for w in model.weights]
    res = personalize.personalize(task, model, personalize.Settings(steps=3, layers="all", batch_size=16))
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(snapshot, model.weights))
    assert res["clients"] == HOSPITALS and any(res["gain"]["auc"])


def test_callback_writes_operator_files_and_keeps_the_model(med_model, tmp_path):
    from tff_pipeline import personalize

    cfg, task, model = med_model
    snapshot = [w.numpy().copy() for w in model.weights]
    lines = []
    run = types.SimpleNamespace(cfg=cfg.replace(personalize=True, personalize_steps=2), task=task,
                                keras_model=model, out=str(tmp_path), log=lines.append)
    personalize.Personalize().on_train_begin(run)
    personalize.Personalize().on_train_end(run)
    assert run.personalization["clients"] == HOSPITALS
    assert os.path.isfile(tmp_path / "operator" / "personalization.json")
    assert os.path.isfile(tmp_path / "operator" / "personalization.png")
    assert any(l.startswith("personalization (2 steps") for l in lines)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(snapshot, model.weights))
    run.cfg = cfg.replace(personalize=False)  # without --personalize: nothing
    run.out = str(tmp_path / "off")
    personalize.Personalize().on_train_end(run)
    assert not os.path.exists(tmp_path / "off")


def _personalize_cli(run_dir, **overrides):
    """scripts/personalize.py's work through cli.call (one ``error:`` line and exit code 2 for a user mistake)."""
    from tff_pipeline import cli, personalize

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.call(lambda argv: personalize.personalize_run_dir(run_dir, overrides, log=print) and 0, [])
    return code, out.getvalue(), err.getvalue()


def test_refusals_are_one_line(med_run, tmp_path):
    out, _ = med_run
    code, _, err = _personalize_cli(out, personalize_layers="middle")
    assert code == 2 and err == "error: --personalize_layers='middle' must be one of all, head, adapters\n"
    code, _, err = _personalize_cli(out, personalize_layers="adapters")
    assert code == 2 and err == ("error: --personalize_layers=adapters: the medical model has no adapters (only "
                                 "keyboard with --lora_rank > 0 has them); use all or head\n")
    code, _, err = _personalize_cli(str(tmp_path))
    assert code == 2 and err == (f"error: --run_dir={tmp_path} is not a finished training run (missing config.json, "
                                 f"privacy_report.json, final_weights.h5)\n")
    code, _, err = _personalize_cli(None)
    assert code == 2 and err == "error: --run_dir is required: a training run's --output_dir\n"
    code, _, err = _personalize_cli(out, personalize_steps=-1)
    assert code == 2 and err == "error: --personalize_steps=-1 must be >= 0\n"
    # the same settings are refused before training starts
    p = call_train(f"--output_dir={tmp_path / 'x'}", "--personalize_layers=adapters", *MED)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --personalize_layers=adapters: the medical model has no adapters (only keyboard with "
        "--lora_rank > 0 has them); use all or head"]


def test_keyboard_personalizes_a_fixed_draw_of_seen_users(keyboard_task):
    from tff_pipeline import personalize

    p = keyboard_task.personalization
    assert "unseen users have no training part" in p.excluded and p.head == ("logits",)
    model = keyboard_task.build_model()
    res = personalize.personalize(keyboard_task, model, personalize.Settings(steps=1, batch_size=8, clients=3))
    assert len(res["clients"]) == 3 and res["clients"] == [c.name for c in p.clients(3, False)]
    assert res["which_clients"].startswith(f"3 of {p.count} users, a fixed public choice")
    assert all(np.isfinite(v) for v in res["personalized_metrics"]["top1_accuracy"])
    assert set(personalize.to_columns(res)[res["clients"][0]]) == {
        f"{pre}{m}" for pre in ("", "personalized_", "personal_gain_") for m in ("top1_accuracy", "top3_accuracy")}


def test_medical_site_effect_diagnostic_reports_every_model_per_hospital():
    """scripts/medical_site_effect.py (README, why medical misses the 3-of-4 bar): on one split, a row per model
    with an accuracy per hospital, and how many hospitals beat the pooled model; a bad flag is one line."""
    p = run_script("medical_site_effect.py", "--splits=1")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in p.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) >= {"pooled", "pooled+site", "local", "site bias"}
    for name in ("pooled", "pooled+site", "local", "site bias"):
        accs = [float(v) for v in rows[name][:4]]
        assert all(0.6 < a <= 1.0 for a in accs), (name, accs)
    for name in ("pooled+site", "local", "site bias"):
        assert 0 <= int(rows[name][5]) <= 4 and rows[name][6].endswith("of 1")
    bad = run_script("medical_site_effect.py", "--splits=0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --splits=0")
