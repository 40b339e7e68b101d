"""The loop's callbacks (as pfl's ``callback/base.py``): the loop only runs
rounds; evaluation, metrics, progress, checkpoints, the budget guard,
export, the report, the audit and the summary hang off it here.

Hooks: ``on_train_begin(run)``, ``before_round(run, r, entry)`` (may stop:
returns a reason), ``after_round(run, result)`` (may stop, may add eval
metrics to ``result``), ``on_train_end(run)``. ``run`` is train.Run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import time
from typing import Optional

from tff_pipeline import progress
from tff_pipeline.io import atomic_write_text
from tff_pipeline.rundir import OPERATOR_DIR, operator_path, release_notes


@dataclasses.dataclass
class RoundResult:
    round_num: int
    cohort_size: int
    seconds: float
    train: dict[str, float]
    clip: Optional[float]
    epsilon: Optional[float]
    eval: dict[str, float] = dataclasses.field(default_factory=dict)  # overall held-out metrics
    eval_by_client: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


class Callback:
    """No-op hooks; a callback overrides the ones it needs."""

    def on_train_begin(self, run) -> None:
        pass

    def before_round(self, run, r: int, entry: dict) -> Optional[str]:
        return None

    def after_round(self, run, result: RoundResult) -> Optional[str]:
        return None

    def on_train_end(self, run) -> None:
        pass


class Evaluate(Callback):
    """Held-out evaluation every --eval_every rounds, at the last round and at a stop (operator-only)."""

    def after_round(self, run, r: RoundResult) -> None:
        if r.round_num % run.cfg.eval_every == 0 or r.round_num == run.cfg.rounds or run.stop.signal:
            run.sync_keras_model()
            with progress.phase(f"evaluating on held-out data after round {r.round_num}"):
                run.last_eval = run.task.evaluate(run.keras_model)
            r.eval, r.eval_by_client = run.last_eval.overall, run.last_eval.by_client

    def on_train_end(self, run) -> None:
        run.sync_keras_model()
        if run.last_eval is None or run.rounds_run % run.cfg.eval_every:
            with progress.phase("evaluating the final model on held-out data"):
                run.last_eval = run.task.evaluate(run.keras_model)


class Checkpointing(Callback):
    """The full training state every --checkpoint_every rounds, at the last round, at a stop and at the end."""

    def __init__(self, last_saved: int):
        self.last_saved = last_saved

    def save(self, run, r: int) -> None:
        from tff_pipeline import checkpoint

        self.last_saved = r
        checkpoint.save(run.out, r, run.state, {
            "ledger_entries": len(run.ledger), "pretrain": run.pretrain,
            "last_eval": run.last_eval.to_json() if run.last_eval else None,
            "schedule": run.sampler.state(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, run.cfg.keep_checkpoints)

    def after_round(self, run, r: RoundResult) -> None:
        if r.round_num % run.cfg.checkpoint_every == 0 or r.round_num == run.cfg.rounds or run.stop.signal:
            self.save(run, r.round_num)

    def on_train_end(self, run) -> None:
        if run.rounds_run > self.last_saved:
            self.save(run, run.rounds_run)  # a budget stop between checkpoints


class BudgetGuard(Callback):
    """--max_epsilon: before a round, stop if recording it would bring ε above the budget."""

    def before_round(self, run, r: int, entry: dict) -> Optional[str]:
        cap = run.cfg.max_epsilon
        if cap is None or not run.mech.is_private:
            return None
        eps_next = run.mech.epsilon_of(run.mech.compose(run.ledger.entries + [entry]))[0]
        if eps_next <= cap:
            return None
        spent = run.epsilon() if len(run.ledger) else 0.0
        return (f"privacy budget: round {r} would raise ε from {spent:.4g} to {eps_next:.4g}, above "
                f"--max_epsilon={cap:g}; stopped after round {r - 1}")


class Export(Callback):
    """saved_model/ and final_weights.h5, each replaced atomically."""

    def on_train_end(self, run) -> None:
        out, model = run.out, run.keras_model
        export_dir = os.path.join(out, "saved_model")
        tmp_dir, old_dir = export_dir + ".tmp", export_dir + ".old.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        run.log("exporting the SavedModel ...")
        with progress.phase("exporting the SavedModel"):
            if run.task.serving_module is not None:  # one module for the SavedModel and model.tflite
                from tasks._common import save_serving

                run.serving_module = run.task.serving_module(model)
                save_serving(run.serving_module, tmp_dir)
            else:
                run.task.export(model, tmp_dir)
        if os.path.exists(export_dir):
            os.replace(export_dir, old_dir)
        os.replace(tmp_dir, export_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
        weights_tmp = os.path.join(out, ".tmp-final_weights.h5")
        model.save_weights(weights_tmp)
        os.replace(weights_tmp, os.path.join(out, "final_weights.h5"))


class TfliteExport(Callback):
    """model.tflite (--tflite=float16 or int8; none skips it) beside the SavedModel, and for the keyboard its
    vocabulary as vocab.txt; operator/tflite.json: its size, the median time of one call on this CPU and its
    agreement with the SavedModel's function on held-out examples (operator-only: computed on held-out data).
    A task whose serving ops TensorFlow Lite lacks gets one line naming them instead."""

    EXAMPLES = 500

    def on_train_end(self, run) -> None:
        from tff_pipeline import tflite

        q, task = run.cfg.tflite, run.task
        path = os.path.join(run.out, "model.tflite")
        if q == "none" or task.serving_module is None:
            return
        if task.tflite_unsupported:
            run.tflite = {"exported": False, "why": task.tflite_unsupported}
            run.log(f"model.tflite: not exported for the {task.name} task: {task.tflite_unsupported}")
            return
        run.log(f"exporting model.tflite ({q} weights) ...")
        with progress.phase(f"exporting model.tflite ({q})"):
            module = run.serving_module or task.serving_module(run.keras_model)
            try:
                blob = tflite.convert(module, q)
            except tflite.Unsupported as e:
                run.tflite = {"exported": False, "why": str(e)}
                run.log(f"model.tflite: not exported for the {task.name} task: {e}")
                return
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        vocab = getattr(module, "vocabulary_file", None)
        if vocab:
            shutil.copyfile(vocab, os.path.join(run.out, ".tmp-vocab.txt"))
            os.replace(os.path.join(run.out, ".tmp-vocab.txt"), os.path.join(run.out, "vocab.txt"))
        with progress.phase("checking model.tflite against the SavedModel"):
            examples, labels = task.device_examples(self.EXAMPLES) if task.device_examples else (None, None)
            res = tflite.check(blob, module, examples, labels)
        run.tflite = {"exported": True, "quantization": q, **res}
        atomic_write_text(operator_path(run.out, "tflite.json"), json.dumps(run.tflite, indent=2) + "\n")
        line = (f"model.tflite: {res['bytes'] / 1e6:.2f} MB ({q}), {res['seconds_per_call_median'] * 1e3:.2f} ms "
                f"per call on this CPU")
        if "top3_agreement" in res:
            line += (f"; top-3 suggestions agree with the SavedModel on {res['top3_agreement']:.1%} of "
                     f"{res['calls_compared']} held-out calls (top-1 {res['top1_agreement']:.1%})")
        elif res["max_abs_difference"]:
            line += (f"; largest difference from the SavedModel over {res['calls_compared']} "
                     f"{'held-out' if examples else 'neutral'} call(s): "
                     + ", ".join(f"{k} {v:.3g}" for k, v in res["max_abs_difference"].items()))
        run.log(line)


class Report(Callback):
    """privacy_report.{json,md} from the ledger's events; with --audit, operator/audit.json."""

    def on_train_end(self, run) -> None:
        from tff_pipeline import report

        mech, entries = run.mech, run.ledger.entries
        per_client = None
        if run.resolved.per_client:
            per_client = {name: {"examples": c["examples"], "q": c["q"],
                                 "epsilon": c["mechanism"].epsilon(len(entries))[0] if mech.is_private else None}
                          for name, c in run.resolved.per_client.items()}
        rep = report.build(
            mech, rounds_run=run.rounds_run, rounds_planned=run.cfg.rounds, entries=entries,
            unit=run.task.record_is if mech.unit == "example" else run.task.privacy_unit,
            per_client=per_client, stop_reason=run.stop_reason, noise_calibration=run.resolved.calibration,
            releases=release_notes(run.task, mech, run.cfg.audit, run.sampler.secret, personalize=run.cfg.personalize),
            sampling_secret=run.sampler.secret,
            max_participations=run.participation.max_per_client() if not run.sampler.secret else None,
            initialisation=None if run.pretrain is None else
            f"pre-trained centrally on {run.pretrain['source']} for {run.pretrain['epochs']} epochs")
        if run.cfg.audit:
            from tff_pipeline import audit

            run.log("auditing: membership inference" + (" and canary exposure" if run.cfg.canaries else "") + " ...")
            with progress.phase("auditing"):
                run.audit_result = audit.run(run.task, run.keras_model, run.participation.clients(), run.cfg.seed,
                                             mech.delta, rep["epsilon"])
            atomic_write_text(operator_path(run.out, "audit.json"), json.dumps(run.audit_result, indent=2) + "\n")
            rep["empirical_audit"] = audit.POINTER
        report.write(run.out, rep)
        report.plot_run(run.metrics_csv.path, operator_path(run.out, "training_curves.png"), run.task.headline_metric)
        run.report = rep


class Summary(Callback):
    """operator/summary.json, operator/heldout_by_client.csv and the closing console lines."""

    def on_train_end(self, run) -> None:
        rep, a = run.report, run.audit_result
        run.summary = summary = {
            "mechanism": run.mech.name, "headline_metric": run.task.headline_metric, "rounds_run": run.rounds_run, "rounds_accounted": len(run.ledger),
            "stop_reason": run.stop_reason, "epsilon": rep["epsilon"], "delta": run.mech.delta,
            "eval": run.last_eval.overall, "eval_by_client": run.last_eval.by_client,
            "baselines": {k: v for k, v in run.task.summary.items() if k.startswith("baselines")},
            "public_pretraining": run.pretrain, "seconds_total": time.monotonic() - run.t_start,
            "seconds_training": run.train_seconds,
            "seconds_per_round": run.train_seconds / max(run.rounds_run - run.first_round + 1, 1),
            "tflite": run.tflite, "personalization": (run.personalization or {}).get("summary")}
        if a:
            mi = a["membership_inference"]
            summary["audit"] = {"mi_auc": mi["auc"], "mi_advantage": mi["advantage"],
                                "epsilon_lower_bound": mi["epsilon_lower_bound"],
                                "canary_exposure_mean": a.get("canary_exposure_mean")}
        if run.stop.signal:
            summary["interrupted"] = True
        atomic_write_text(operator_path(run.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        from tff_pipeline import html_report

        with progress.phase("writing privacy_report.html"):  # after summary.json: the operator page shows it
            html_report.write_pages(run.out, rep)
        self.print(run, rep, summary)

    def print(self, run, rep, summary) -> None:
        log, out = run.log, run.out
        log("")
        log(rep["statement"])
        log("")
        overall = run.last_eval.overall
        by_client = {name: dict(row) for name, row in run.last_eval.by_client.items()}
        if run.personalization:  # per-client columns of --personalize (operator-only, like the rest of the table)
            from tff_pipeline.personalize import merge_by_client

            by_client = merge_by_client(by_client, run.personalization)
        log("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in overall.items() if isinstance(v, (int, float))))
        compared = comparison(run.task, overall, run.pretrain)
        if compared:
            log(compared)
        if by_client:
            for name, base in run.task.summary.get("baselines_by_client", {}).items():
                if name in by_client:
                    by_client[name].update({f"baseline_{k}": v for k, v in base.items()})
            write_by_client(operator_path(out, "heldout_by_client.csv"), by_client)
            log(f"held-out per client: {operator_path(out, 'heldout_by_client.csv')} (operator-only)")
        a = run.audit_result
        if a:
            mi = a["membership_inference"]
            acc_eps = "∞" if rep["epsilon"] is None else f"{rep['epsilon']:.4f}"
            log(f"audit: membership inference AUC {mi['auc']:.4f}, advantage {mi['advantage']:.4f}, ε lower bound "
                f"{mi['epsilon_lower_bound']:.4f} (accountant ε {acc_eps})"
                + (f"; canary exposure {a['canary_exposure_mean']:.2f} bits" if a.get("canaries") else ""))
        log(f"privacy report: {os.path.join(out, 'privacy_report.md')} and .html (operator copy with the "
            f"operator-only plots: {operator_path(out, 'privacy_report.html')})")
        log(f"SavedModel:     {os.path.join(out, 'saved_model')}")
        if (getattr(run, "tflite", None) or {}).get("exported"):
            log(f"TFLite:         {os.path.join(out, 'model.tflite')}")
        log(f"TensorBoard:    tensorboard --logdir {operator_path(out, TensorBoardEvents.DIR)} (operator-only)")
        log(f"metrics:        {run.metrics_csv.path} (operator-only, like everything in "
            f"{os.path.join(out, OPERATOR_DIR)})")
        log(f"wall time {summary['seconds_total']:.1f} s, {summary['seconds_per_round']:.2f} s/round")


class MetricsCsv(Callback):
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
        atomic_write_text(self.path, buf.getvalue())

    def truncate(self, last_round: int) -> None:
        """Drops rows after ``last_round`` (rounds lost in a crash, re-run on resume)."""
        rows, fields = self._read()
        if rows:
            self._write([x for x in rows if int(x["round"]) <= last_round], fields)

    def after_round(self, run, r: "RoundResult") -> None:
        row = {"round": r.round_num, "cohort_size": r.cohort_size, "seconds": round(r.seconds, 4),
               **{f"train_{k}": v for k, v in r.train.items()},
               "clip_norm": r.clip, "epsilon": r.epsilon, **{f"eval_{k}": v for k, v in r.eval.items()},
               **{f"eval_{c}_{k}": v for c, row in r.eval_by_client.items() for k, v in row.items()}}
        rows, fields = self._read()
        fields += [k for k in row if k not in fields]
        self._write(rows + [row], fields)


def comparison(task, overall: dict, pretrain: Optional[dict]) -> str:
    """The headline metric beside the public-only start and the task's baselines on the same split (computed
    from the clients' data without noise: operator-only, like the rest of this console output)."""
    m = task.headline_metric
    if m not in overall:
        return ""
    v, parts = overall[m], []
    if pretrain and m in pretrain.get("eval", {}):
        p = pretrain["eval"][m]
        parts.append(f"public-only {p:.4f} ({(v / p - 1) * 100:+.1f}%)")
    from tff_pipeline.task import matching_baselines

    for k, b in matching_baselines(m, task.summary.get("baselines_this_split", {})).items():
        if b:
            parts.append(f"{k} {b:.4f} ({(v / b - 1) * 100:+.1f}%)")
    return f"{m} {v:.4f} against " + ", ".join(parts) if parts else ""


def write_by_client(path: str, by_client: dict) -> None:
    keys = {k for row in by_client.values() for k in row}
    fields = sorted(k for k in keys if not k.startswith("baseline_")) + sorted(k for k in keys if k.startswith("baseline_"))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["client"] + fields)
    for name, row in by_client.items():
        w.writerow([name] + [f"{row[k]:.6g}" if k in row else "" for k in fields])
    atomic_write_text(path, buf.getvalue())


class Progress(Callback):
    """One line per round: round, time, ETA, loss, clip, ε so far, eval."""

    def __init__(self, total: int, headline: str):
        self.total, self.headline = total, headline
        self.start = time.monotonic()
        self.round_times: list[float] = []

    def after_round(self, run, r: "RoundResult") -> None:
        if r.round_num == 0:  # public pre-training, not a federated round
            run.log(f"round    0/{self.total} | public pre-training {r.seconds:.1f} s | loss {r.train['loss']:.4f} | "
                    f"{self.headline} {r.eval.get(self.headline, float('nan')):.4f}")
            return
        self.round_times.append(r.seconds)
        recent = self.round_times[-10:]
        eta = (self.total - r.round_num) * (sum(recent) / len(recent))
        eps = "∞ (no DP)" if r.epsilon is None else f"{r.epsilon:.3f}"
        line = (f"round {r.round_num:>4}/{self.total} | {r.seconds:5.2f} s | ETA {progress.fmt_secs(eta)} | "
                f"clients {r.cohort_size:>3} | loss {r.train.get('loss', float('nan')):.4f} | "
                + (f"FedAtt effective clients {r.train['effective_clients']:.1f} | " if "effective_clients" in r.train
                   else f"clip {r.clip if r.clip is not None else float('nan'):.3f} | ") + f"ε {eps}")
        if r.train.get("expected_noise_norm"):  # the noise this round against the signal it carried
            line += (f" | signal/noise {r.train['signal_norm_estimate']:.3g}/"
                     f"{r.train['expected_noise_norm']:.3g}")
        if r.eval:
            line += f" | {self.headline} {r.eval.get(self.headline, float('nan')):.4f}"
        run.log(line)




class TensorBoardEvents(Callback):
    """``operator/tensorboard/``: tf.summary events of the run, for ``tensorboard --logdir`` (``make tensorboard``).

    Step = round (0 = after public pre-training). Per round: the training metrics (``train/``), ε spent
    (``privacy/epsilon_rdp``; ``privacy/epsilon_pld`` at evaluation rounds and the last round, where the mechanism
    has a PLD accountant: composing a PLD costs about 2 s, too much for every round), the clip norm, the cohort
    size, the noise-to-signal ratio of the aggregate where the mechanism measures it, seconds (``round/``); the
    held-out metrics when evaluated (``eval/``); the public pre-training curve (``pretrain/loss`` per epoch); the
    config as text. Operator-only, like metrics.csv: training metrics and held-out metrics are computed from the
    clients' data without noise. A resumed run first drops the events of rounds after its checkpoint (they are
    trained again), so each step has one value.
    """

    DIR = "tensorboard"

    def __init__(self):
        self.writer = None

    def on_train_begin(self, run) -> None:
        import tensorflow as tf

        logdir = operator_path(run.out, self.DIR)
        if run.first_round > 1:
            _truncate_events(logdir, run.first_round - 1)
        elif os.path.isdir(logdir):  # a new run in this directory (--overwrite removed operator/ already)
            shutil.rmtree(logdir)
        self.writer = tf.summary.create_file_writer(logdir)
        with self.writer.as_default():
            if run.first_round == 1:
                text = json.dumps({"config": run.cfg.to_json(), "mechanism": run.mech.name,
                                   "noise_multiplier": getattr(run.mech, "noise_multiplier", None)}, indent=2, default=str)
                tf.summary.text("config", "```\n" + text + "\n```", step=0)
                for i, loss in enumerate((run.pretrain or {}).get("loss_per_epoch", ()), start=1):
                    tf.summary.scalar("pretrain/loss", loss, step=i)
        self.writer.flush()

    def after_round(self, run, r: RoundResult) -> None:
        import tensorflow as tf

        s = {f"train/{k}": v for k, v in r.train.items()}
        s.update({f"eval/{k}": v for k, v in r.eval.items() if isinstance(v, (int, float))})
        if r.round_num > 0:
            s.update({"round/clip_norm": r.clip, "round/cohort_size": r.cohort_size, "round/seconds": r.seconds})
            if r.train.get("expected_noise_norm") and r.train.get("signal_norm_estimate"):
                s["round/noise_to_signal"] = r.train["expected_noise_norm"] / r.train["signal_norm_estimate"]
        if r.epsilon is not None:
            s["privacy/epsilon_rdp"] = r.epsilon
            if r.round_num > 0 and (r.eval or r.round_num == run.cfg.rounds):
                pld = run.mech.pld_epsilon(run.mech.compose(run.ledger.entries), run.mech.delta)
                if pld is not None:
                    s["privacy/epsilon_pld"] = pld
        with self.writer.as_default():
            for k, v in s.items():
                if v is not None and math.isfinite(float(v)):
                    tf.summary.scalar(k, float(v), step=r.round_num)
        self.writer.flush()

    def on_train_end(self, run) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_events(logdir: str, last_round: int) -> None:
    """Rewrites the event files under ``logdir`` without the values of steps after ``last_round`` (rounds lost
    in a crash or a stop after the checkpoint, trained again on resume)."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    if not os.path.isdir(logdir):
        return
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if "tfevents" not in name or name.endswith(".tmp"):
            continue
        kept = []
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            ev = event_pb2.Event.FromString(raw)
            if not ev.HasField("summary") or ev.step <= last_round:
                kept.append(raw)
        with tf.io.TFRecordWriter(path + ".tmp") as w:
            for raw in kept:
                w.write(raw)
        os.replace(path + ".tmp", path)
