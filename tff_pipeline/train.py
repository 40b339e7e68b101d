"""The training loop: plan a round with the mechanism's schedule, record it in
the privacy ledger, run it, and hand the result to the callbacks
(tff_pipeline.callbacks: evaluation, metrics, progress, checkpoints, the
budget guard; then export, report, audit and summary at the end).

``run(cfg)`` is the one library call behind ``scripts/train.py``. The loop
knows nothing of any one mechanism: it asks the mechanism object
(tff_pipeline.mechanisms) for the schedule, the ledger entry, the process and
how to read a round's measurements.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

from tff_pipeline import progress
from tff_pipeline.callbacks import (BudgetGuard, Callback, Checkpointing, Evaluate, Export, MetricsCsv, Progress,
                                    Report, RoundResult, Summary, TensorBoardEvents, TfliteExport)
from tff_pipeline.config import ConfigError, TrainConfig
from tff_pipeline.personalize import Personalize
from tff_pipeline.io import atomic_write_text
from tff_pipeline.rundir import (AUDIT_NOT_COVERED, OPERATOR_DIR, RUN_DIRS, RUN_FILES,  # noqa: F401 (re-exported)
                                 check_resume_compatible, operator_path, package_versions, prepare_output_dir,
                                 release_notes, remove_entries)


def privacy_headline(cfg: TrainConfig, defaulted: bool) -> str:
    """The run's first line: which ε it aims at, or that it is not private."""
    p = cfg.privacy
    if p.target_epsilon is not None:
        why = (f"the {cfg.task} task's default; set --target_epsilon or --noise_multiplier to choose, "
               f"--noise_multiplier=0 for no DP" if defaulted else "--target_epsilon")
        return f"privacy: aiming at ε = {p.target_epsilon:g} (δ = {p.delta:g}) over {cfg.rounds} rounds ({why})"
    if p.noise_multiplier == 0:
        return ("privacy: NONE. --noise_multiplier=0 trains WITHOUT differential privacy; no (ε, δ) guarantee "
                "will hold for this model")
    return (f"privacy: noise multiplier {p.noise_multiplier:g} (--noise_multiplier); the ε it gives over "
            f"{cfg.rounds} rounds follows once the data is loaded")



@dataclasses.dataclass
class Run:
    """What the loop and its callbacks share for one training run."""

    cfg: TrainConfig
    task: Any
    resolved: Any  # mechanisms.Resolved: the mechanism, its calibration, per-client mechanisms
    log: Callable[[str], None]
    t_start: float
    ledger: Any
    participation: Any
    metrics_csv: MetricsCsv
    process: Any = None
    state: Any = None
    keras_model: Any = None
    sampler: Any = None
    num_workers: int = 1
    pretrain: Optional[dict] = None
    first_round: int = 1
    rounds_run: int = 0
    last_eval: Any = None  # task.Evaluation of the latest held-out evaluation
    stop_reason: str = "completed all planned rounds"
    train_seconds: float = 0.0
    stop: Any = None
    report: Optional[dict] = None
    audit_result: Optional[dict] = None
    serving_module: Any = None  # the task's serving module Export saved (TfliteExport converts the same one)
    tflite: Optional[dict] = None  # TfliteExport's result
    personalization: Optional[dict] = None  # Personalize's result (tff_pipeline.personalize), with --personalize
    summary: Optional[dict] = None

    @property
    def mech(self):
        return self.resolved.mechanism

    @property
    def out(self) -> str:
        return self.cfg.output_dir

    def epsilon(self) -> Optional[float]:
        """ε of every round result the ledger holds (the composition of its events)."""
        if not self.mech.is_private:
            return None
        return self.mech.epsilon_of(self.mech.compose(self.ledger.entries))[0] if len(self.ledger) else 0.0

    def sync_keras_model(self) -> None:
        self.process.get_model_weights(self.state).assign_weights_to(self.keras_model)

    def round_data(self, r: int, ids) -> list:
        from tff_pipeline import cohort

        data = [self.task.client_dataset(int(i), self.cfg.seed * 1_000_003 + r) for i in ids]
        if self.cfg.meta_learning == "reptile":  # each client's inner loop: exactly --personalize_steps steps
            data = [cohort.reptile_steps(d, self.cfg.personalize_steps) for d in data]
        if self.mech.unit != "client" or not getattr(self.mech, "cohort_shards", True):
            return [cohort.without_autotune(d) for d in data]  # TFF's per-client process
        # The cohort as one shard per worker; an empty cohort is still a round (noise only, counted). With secure
        # aggregation or FedAtt one shard per client: a shard sums its clients in plaintext.
        shards = len(data) if getattr(self.mech, "one_client_per_shard", False) else self.num_workers
        return cohort.shard_cohort(data, shards) or cohort.empty_shards(self.task.element_spec)


def _print(line: str) -> None:
    print(line, flush=True)  # piped output (a log file, the frontier) shows each line when it happens


def run(cfg: TrainConfig, overwrite: bool = False, callbacks: tuple[Callback, ...] = (),
        log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Trains cfg.task with its DP mechanism and writes config.json, the
    ledger, privacy_report.{json,md}, saved_model/ and operator/ to
    cfg.output_dir. An existing run there (one with a privacy ledger) is
    resumed from its last checkpoint, with every round it released counted."""
    t_start = time.monotonic()
    with progress.Console(log, tty=log is _print and sys.stdout.isatty()) as console:
        return _run_logged(cfg, overwrite, callbacks, console, t_start)


def _run_logged(cfg: TrainConfig, overwrite: bool, callbacks, log, t_start: float) -> dict[str, Any]:
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


def _run(cfg: TrainConfig, callbacks, log, t_start: float, previous: Optional[dict], stale: list[str],
         defaulted: bool = False) -> dict[str, Any]:
    run, ckpt = _setup(cfg, log, t_start, previous, stale, defaulted)
    rows = [run.metrics_csv, Progress(cfg.rounds, run.task.headline_metric), TensorBoardEvents()]
    hooks = [Evaluate(), *rows, Checkpointing(ckpt[0] if ckpt else 0), BudgetGuard(), Personalize(), *callbacks]
    for h in hooks:
        h.on_train_begin(run)
    if run.pretrain is not None and not ckpt:  # row 0: after public pre-training, nothing private spent
        p = run.pretrain
        row = RoundResult(0, 0, p["seconds"], {"loss": p["loss"]}, None, 0.0 if run.mech.is_private else None,
                          p["eval"])
        for h in rows:
            h.after_round(run, row)
    _loop(run, hooks)
    log("evaluating, exporting and writing the privacy report ...")
    for h in [*hooks, Export(), TfliteExport(), Report(), Summary()]:
        h.on_train_end(run)
    return run.summary


def _loop(run: Run, hooks: list) -> None:
    run.stop = stop = _StopFlag()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    t_train = time.monotonic()
    try:
        for r in range(run.first_round, run.cfg.rounds + 1):
            if stop.signal:
                break
            with progress.phase(f"training round {r}"):
                reason = _round(run, hooks, r)
            if reason:
                run.stop_reason = reason
                run.log(reason)
                break
            if stop.signal and r < run.cfg.rounds:  # a signal in the last round: the run is complete anyway
                run.stop_reason = f"interrupted by {signal.Signals(stop.signal).name} after round {r}"
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    run.train_seconds = time.monotonic() - t_train


def _round(run: Run, hooks: list, r: int) -> Optional[str]:
    """One round; returns a reason to stop, if a callback gives one."""
    t0 = time.monotonic()
    attempt = run.ledger.attempts(r)
    before = run.sampler.state()
    plan = run.sampler.plan(r, attempt, run.ledger)
    entry = run.mech.ledger_entry(plan)
    for h in hooks:
        reason = h.before_round(run, r, entry)
        if reason:  # the round does not run: the schedule forgets its plan (a DP-FTRL tree it would have begun)
            if hasattr(run.sampler, "restore"):
                run.sampler.restore(before, False, None)
            return reason
    # Recorded before the round runs: a round that is released, or that dies half-way, is counted.
    run.ledger.append(r, entry)
    run.participation.append(r, attempt, plan.clients)
    run.state = run.mech.before_round(run.process, run.state, plan)
    result = run.process.next(run.state, run.round_data(r, plan.clients))
    run.state, run.rounds_run = result.state, r
    train, clip = run.mech.read_round(_flatten(result.metrics))
    rr = RoundResult(r, len(plan.clients), time.monotonic() - t0, train, clip, run.epsilon())
    reasons = [h.after_round(run, rr) for h in hooks]
    return next((x for x in reasons if x), None)


def _setup(cfg, log, t_start, previous, stale, defaulted) -> tuple[Run, Optional[tuple]]:
    """Task, mechanism and run directory; checks everything before anything changes."""
    import tasks

    from tff_pipeline import checkpoint, mechanisms, runtime

    with progress.phase(f"loading the {cfg.task} data"):
        task = tasks.build(cfg)
    unit = mechanisms.REGISTRY[mechanisms.name_for(cfg, task)].unit
    if cfg.audit and (task.audit is None or unit != "client"):  # a capability the task lacks: before anything
        raise ConfigError(f"--audit: task {task.name!r} has no membership-inference audit at the {unit} level "
                          f"(only keyboard at --privacy_unit=client has one); run without --audit")
    resolved = mechanisms.resolve(cfg, task)
    mech = resolved.mechanism
    if task.adapter_rank and (cfg.frozen_layers or not cfg.public_pretrain_epochs):
        raise ConfigError(f"--lora_rank={task.adapter_rank}: adapters fine-tune a pre-trained model, and only they "
                          f"train in the federated rounds; give --public_pretrain_epochs > 0 and no --freeze_layers")
    if cfg.public_pretrain_epochs and task.public_data is None:
        raise ConfigError(f"--public_pretrain_epochs={cfg.public_pretrain_epochs}: task {task.name!r} has no "
                          f"public data; use --public_pretrain_epochs=0")
    if resolved.calibration and defaulted:
        resolved.calibration["task_default"] = True
    # An unreachable --workers, or one whose TLS does not match ours, fails here, before anything changes.
    runtime.check_reachable(cfg.worker_addresses, tls=cfg.workers_tls)
    remove_entries(cfg.output_dir, stale)  # --overwrite: only now that the data and settings passed their checks
    ledger = checkpoint.Ledger(cfg.output_dir)
    ckpt = checkpoint.latest(cfg.output_dir) if previous else None
    if previous is not None:
        _check_resume(cfg, previous, mech, ckpt, len(ledger), log)
    log(f"task {task.name}: {task.population} training clients; mechanism {mech.name}; "
        + (f"noise multiplier {mech.noise_multiplier:.4f}" + (" (calibrated)" if resolved.calibration else "")
           + f": ε = {mech.epsilon(cfg.rounds)[0]:.4g} at δ = {mech.delta:g} after {cfg.rounds} rounds"
           if mech.is_private else "noise multiplier 0: NO differential privacy"))
    _write_config(cfg, mech, resolved, previous, ckpt, task)
    metrics_csv = MetricsCsv(operator_path(cfg.output_dir, "metrics.csv"))
    if ckpt:
        metrics_csv.truncate(ckpt[0])
    elif os.path.exists(metrics_csv.path):
        os.unlink(metrics_csv.path)
    run = Run(cfg, task, resolved, log, t_start, ledger,
              checkpoint.Participation(operator_path(cfg.output_dir, "participation.jsonl")), metrics_csv)
    _start_training_state(run, ckpt)
    log(f"start-up {time.monotonic() - t_start:.1f} s; training {cfg.rounds} rounds with {mech.name}: "
        f"{mech.sampling_section()['description']}")
    return run, ckpt


def _check_resume(cfg, previous, mech, ckpt, ledger_len: int, log) -> None:
    done = ckpt[0] if ckpt else 0
    if done >= cfg.rounds:
        raise ConfigError(f"--output_dir={cfg.output_dir} already holds a completed run of {done} rounds; choose a "
                          f"new --output_dir, pass --overwrite to replace it, or raise --rounds above {done} to "
                          f"train on from it")
    check_resume_compatible(cfg, previous, mech, cfg.output_dir)
    log(f"resuming {cfg.output_dir}: " + (f"from the checkpoint of round {done}" if ckpt else
                                          "no checkpoint, from round 1")
        + f"; the privacy ledger holds {ledger_len} round results, all counted")


def _write_config(cfg, mech, resolved, previous, ckpt, task) -> None:
    """config.json holds settings only; values computed from the data go to operator/ (release_notes)."""
    info = {"config": cfg.to_json(), "mechanism": mech.name, "privacy_unit": mech.unit,
            "privacy": dataclasses.asdict(mech), "noise_calibration": resolved.calibration,
            "versions": package_versions(), "command": sys.argv,
            # what reproduces this run from its settings alone (a frontier point's argv is the frontier's)
            "train_command": ["scripts/train.py", *(f"--{k}={v}" for k, v in cfg.to_json().items() if v is not None)]}
    if previous is not None:
        info = {**previous, "config": cfg.to_json(),
                "resumes": previous.get("resumes", []) + [{"command": sys.argv, "from_round": ckpt[0] if ckpt else 0,
                                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]}
    info.pop("data", None)  # written by earlier versions; now operator-only
    atomic_write_text(os.path.join(cfg.output_dir, "config.json"), json.dumps(info, indent=2, default=str) + "\n")
    atomic_write_text(operator_path(cfg.output_dir, "data_summary.json"),
                      json.dumps(task.summary, indent=2, default=str) + "\n")


def _start_training_state(run: Run, ckpt) -> None:
    """The process, its state (from the checkpoint, or the Keras model built from --seed and pre-trained on
    public data if asked) and the mechanism's schedule."""
    import tensorflow as tf

    from tff_pipeline import checkpoint, dp_fedavg, runtime

    cfg, task, mech = run.cfg, run.task, run.mech
    with progress.phase("starting the TFF worker" + ("s" if cfg.worker_addresses else "")):
        run.num_workers = runtime.install_context(cfg.worker_addresses, cfg.workers_tls)
    dp_fedavg.set_frozen(task.build_model(), cfg.frozen_layers)  # checks --freeze_layers before the long build
    run.log(f"building the {mech.name} process ...")
    with progress.phase(f"building the {mech.name} process"):
        run.process = mech.build_process(task, cfg)
        run.state = run.process.initialize()
    tf.keras.utils.set_random_seed(cfg.seed)  # the start model comes from --seed
    run.keras_model = dp_fedavg.build_keras_model(task, cfg.frozen_layers)
    run.sampler = mech.sampler(cfg.privacy.public_sampling_seed)
    if ckpt:
        run.state, meta = checkpoint.load(ckpt[1], run.state)
        run.first_round, run.pretrain = ckpt[0] + 1, meta.get("pretrain")
        from tff_pipeline.task import Evaluation

        run.last_eval = Evaluation.from_json(meta.get("last_eval"))
        if hasattr(run.sampler, "restore"):
            run.sampler.restore(meta.get("schedule"), len(run.ledger) > meta.get("ledger_entries", 0),
                                _last_tree(run.ledger))
        return
    if hasattr(run.sampler, "restore") and len(run.ledger):  # crashed before the first checkpoint
        run.sampler.restore(None, True, _last_tree(run.ledger))
    # The start model is the Keras model built here from --seed (then pre-trained, if asked), not TFF's own
    # initialisation: the same seed gives the same start on one local worker or on several.
    if cfg.public_pretrain_epochs:
        with progress.phase("pre-training on public data"):
            run.pretrain = pretrain_on_public_data(task, cfg, run.keras_model, run.log)
    import tensorflow_federated as tff

    run.state = run.process.set_model_weights(run.state, tff.learning.models.ModelWeights.from_model(run.keras_model))


def _last_tree(ledger) -> Optional[int]:
    trees = [e["tree"] for e in ledger.entries if e.get("tree") is not None]
    return max(trees) if trees else None


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


def pretrain_on_public_data(task, cfg: TrainConfig, keras_model, log) -> dict[str, Any]:
    """Central training on the task's public data (no client's data, so no
    privacy cost); the federated rounds start from these weights (_setup checked the task has some)."""
    import tensorflow as tf

    t0 = time.monotonic()
    x, y = task.public_data
    log(f"pre-training on public data: {len(x)} examples, {cfg.public_pretrain_epochs} epochs ...")
    tf.keras.utils.set_random_seed(cfg.seed)
    from tff_pipeline import dp_fedavg

    dp_fedavg.set_frozen(keras_model, (), phase="public")
    keras_model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=task.loss())

    epochs, steps = cfg.public_pretrain_epochs, -(-len(x) // 32)

    class EpochLog(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            progress.report(self.epoch * steps + batch + 1, epochs * steps, "batches",
                            f"epoch {self.epoch + 1}/{epochs}, loss {logs['loss']:.4f}")

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_epoch_end(self, epoch, logs=None):
            log(f"pre-training epoch {epoch + 1}/{epochs}: loss {logs['loss']:.4f} "
                f"({time.monotonic() - t0:.0f} s)")

    hist = keras_model.fit(x, y, batch_size=32, epochs=cfg.public_pretrain_epochs, verbose=0, shuffle=True,
                           callbacks=[EpochLog()])
    dp_fedavg.set_frozen(keras_model, cfg.frozen_layers)
    with progress.phase("evaluating the pre-trained model on held-out data"):
        ev = task.evaluate(keras_model).overall
    out = {"epochs": cfg.public_pretrain_epochs, "examples": int(len(x)), "source": task.public_data_source,
           "loss": float(hist.history["loss"][-1]), "loss_per_epoch": [float(v) for v in hist.history["loss"]],
           "eval": ev, "seconds": time.monotonic() - t0}
    log(f"pre-trained on public data ({task.public_data_source}) for {cfg.public_pretrain_epochs} epochs in "
        f"{out['seconds']:.1f} s: loss {out['loss']:.4f}, {task.headline_metric} {ev[task.headline_metric]:.4f}")
    return out


