"""Personalization (issue 18, ``--personalize``): each evaluation client fine-tunes the released global model on its
own training part for a few steps and is scored on its own held-out part, before and after.

The protocol is fine-tune-then-evaluate, as in Wang et al. 2019, "Federated Evaluation of On-device
Personalization" (https://arxiv.org/abs/1910.10252), and Jiang et al. 2019, "Improving Federated Learning
Personalization via Model Agnostic Meta Learning" (https://arxiv.org/abs/1909.12488): from the global model,
``--personalize_steps`` steps of plain SGD (``--personalize_learning_rate``, batches of ``--batch_size`` of the
client's own training examples) on ``--personalize_layers`` (all weights, the output layer(s), or the low-rank
adapters), then the task's per-client metric on the client's held-out part. Every client starts from the global
model again.

The output follows TFF's ``tff.learning.algorithms.build_personalization_eval_computation``: per metric, a list
over clients of the global model's values (``baseline_metrics``) and of the personalized ones
(``personalized_metrics``), position i of every list being client i. It runs here in Keras rather than as that TFF
computation: the tasks' per-client metrics are Keras/numpy code on the task's own held-out parts (traffic scores
in original units, undoing each window's normalisation, which a TFF VariableModel never sees), and the TFF
computation collects a random reservoir sample of clients, where the operator wants a fixed, stated set.

Privacy: nothing here leaves a client or is released. Each client's personalized model is trained on its own data
without DP and stays with it; the global model is only read (its weights are checked to be bit-identical after),
so the guarantee of the global model is unchanged. Everything written (operator/personalization.json, .png, the
per-client columns) is computed on held-out data without noise: operator-only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from tff_pipeline import progress
from tff_pipeline.callbacks import Callback
from tff_pipeline.config import ConfigError
from tff_pipeline.rundir import PERSONALIZATION_STATEMENT, operator_path

JSON_NAME, PNG_NAME = "personalization.json", "personalization.png"
VALIDATION_JSON_NAME, VALIDATION_PNG_NAME = "personalization_validation.json", "personalization_validation.png"
BATCH_DRAW = 0x9E75  # each client's batches: np.random.default_rng([seed, client position, BATCH_DRAW])
BAR_CHART_MAX = 40  # up to this many clients, one bar each; more (keyboard users): a histogram


@dataclasses.dataclass(frozen=True)
class Settings:
    """How each client personalizes (the --personalize_* flags, and --batch_size, --seed of the run).
    ``validation``: fine-tune on the earlier 80% of each client's training part and score on the rest, never on
    its held-out part (for choosing these settings)."""

    steps: int = 10
    learning_rate: float = 0.03
    layers: str = "all"
    clients: int = 200
    batch_size: int = 16
    seed: int = 0
    validation: bool = False

    @classmethod
    def from_config(cls, cfg, validation: bool = False) -> "Settings":
        return cls(cfg.personalize_steps, cfg.personalize_learning_rate, cfg.personalize_layers,
                   cfg.personalize_clients, cfg.batch_size, cfg.seed, validation)

    def describe(self) -> str:
        what = {"all": "all weights", "head": "the output layer(s)", "adapters": "the adapters"}[self.layers]
        return (f"{self.steps} SGD steps (learning rate {self.learning_rate:g}, batch {self.batch_size}) on "
                f"{what}")


def personalize(task, global_model, settings: Settings) -> dict[str, Any]:
    """Personalizes ``global_model`` on each of the task's evaluation clients (see the module docstring); the
    result as a JSON-able dict (``to_columns`` and ``write`` read it). ``global_model`` is left bit-identical."""
    p = task.personalization
    if p is None:
        raise ConfigError(f"--personalize: task {task.name!r} has no per-client training and held-out parts")
    t0 = time.monotonic()
    snapshot = [v.numpy() for v in global_model.weights]
    clone, clone_vars = _clone(global_model)
    _set_trainable(clone, settings.layers, p.head, task.name)
    n_total = p.count
    with progress.phase(f"loading the {p.client_is}s' own data for personalization"):
        clients = p.clients(settings.clients, settings.validation)
    n = len(clients)
    if not n:
        raise ConfigError(f"--personalize: task {task.name!r} has no client to personalize"
                          + (f" ({p.excluded})" if p.excluded else ""))
    step = _Step(clone, task.loss(), settings.learning_rate, clients[0].train[1])
    baseline: list[dict] = []
    personal: list[dict] = []
    with progress.phase(f"personalizing on {n} {p.client_is}s"):
        for i, c in enumerate(clients):
            for v, w in zip(clone_vars, snapshot):
                v.assign(w)
            step.reset()
            baseline.append(p.metric(clone, c.heldout))
            x, y = c.train
            rng = np.random.default_rng([settings.seed, i, BATCH_DRAW])
            for idx in _batches(len(x), settings.batch_size, settings.steps, rng):
                step(x[idx], y[idx])
            personal.append(p.metric(clone, c.heldout))
            progress.report(i + 1, n, f"{p.client_is}s")
    changed = [v.name for v, w in zip(global_model.weights, snapshot) if not np.array_equal(v.numpy(), w)]
    if changed:  # a bug of ours, never the user's: the released model must not move
        raise RuntimeError(f"personalization changed the global model's weights {changed[:3]}")
    return _result(task, p, settings, clients, baseline, personal, n_total, time.monotonic() - t0)


def _clone(model):
    """A copy of ``model`` to fine-tune, and its variables in the order of ``model.weights``. Every (nested)
    layer of the copy first gets the original's trainable flag: Keras lists weights trainable first, so the two
    lists then pair up one to one."""
    import tensorflow as tf

    clone = tf.keras.models.clone_model(model)
    originals, copies = list(model._flatten_layers()), list(clone._flatten_layers())
    if len(originals) != len(copies):
        raise RuntimeError(f"clone_model gave {len(copies)} layers for {len(originals)}")
    for a, b in zip(originals, copies):
        b._trainable = a._trainable
    pairs = list(zip(model.weights, clone.weights))
    if len(model.weights) != len(clone.weights) or any(a.shape != b.shape for a, b in pairs):
        raise RuntimeError("clone_model gave weights that do not pair with the model's")
    return clone, [b for _, b in pairs]


def _set_trainable(model, layers: str, head: tuple, task_name: str) -> None:
    """Which of the copy's weights fine-tune: every one, the head layers', or the adapters'."""
    from tff_pipeline import adapters

    if layers == "adapters":
        if not adapters.has_adapters(model):
            raise ConfigError(f"--personalize_layers=adapters: the {task_name} model has no adapters (only keyboard "
                              f"with --lora_rank > 0 has them); use all or head")
        adapters.set_trainable(model, "adapters")
        return
    adapters.set_trainable(model, "all")
    if layers == "head":
        names = {layer.name for layer in model.layers}
        missing = [h for h in head if h not in names]
        if missing:
            raise RuntimeError(f"the {task_name} model has no head layer {missing[0]!r}")
        for layer in model.layers:
            layer.trainable = layer.name in head
    if not model.trainable_weights:
        raise RuntimeError(f"--personalize_layers={layers}: nothing of the {task_name} model would train")


class _Step:
    """One SGD step on the copy's trainable weights, traced once (a batch dimension of any size)."""

    def __init__(self, model, loss, learning_rate: float, y_example):
        import tensorflow as tf

        self.model, self.loss = model, loss
        self.variables = model.trainable_variables
        self.opt = tf.keras.optimizers.SGD(learning_rate)
        self.opt.build(self.variables)
        x_spec = [tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in model.inputs][0]
        y_spec = tf.TensorSpec([None, *np.shape(y_example)[1:]], tf.as_dtype(np.asarray(y_example).dtype))

        @tf.function(input_signature=[x_spec, y_spec])
        def step(x, y):
            with tf.GradientTape() as tape:
                value = self.loss(y, self.model(x, training=True))
            grads = tape.gradient(value, self.variables)
            self.opt.apply_gradients(zip(grads, self.variables))
            return value

        self.fn = step

    def reset(self) -> None:
        for v in self.opt.variables:
            v.assign(np.zeros(v.shape, v.dtype.as_numpy_dtype))

    def __call__(self, x, y):
        return self.fn(x, y)


def _batches(n: int, batch: int, steps: int, rng):
    """``steps`` index batches of min(batch, n): passes over a fresh permutation, a short tail dropped."""
    size, order = min(batch, n), np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) < size:
            order = rng.permutation(n)
        yield np.sort(order[:size])
        order = order[size:]


def _gain(before: float, after: float, higher_is_better: bool) -> float:
    return (after - before) if higher_is_better else (before - after)


def _clean(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _result(task, p, settings: Settings, clients, baseline, personal, n_total: int, seconds: float) -> dict:
    names = [c.name for c in clients]
    metrics = list(dict.fromkeys(k for row in baseline for k in row))
    gain = {m: [_gain(b.get(m, math.nan), a.get(m, math.nan), p.higher_is_better) for b, a in zip(baseline, personal)]
            for m in metrics}
    g = np.asarray(gain[p.headline], float)
    g = g[np.isfinite(g)]
    before = np.asarray([b[p.headline] for b in baseline], float)
    after = np.asarray([a[p.headline] for a in personal], float)
    subset = f"all {len(names)} {p.client_is}s"
    if len(names) < n_total:
        subset = f"{len(names)} of {n_total} {p.client_is}s"
        if 0 < settings.clients < n_total:
            subset += f", a fixed public choice (--personalize_clients={settings.clients})"
        if settings.validation:
            subset += " (those with something to score in the last 20% of their training part)"
    summary = {
        "clients": len(names), "metric": p.headline, "higher_is_better": p.higher_is_better,
        "baseline_mean": float(np.nanmean(before)), "personalized_mean": float(np.nanmean(after)),
        "mean_gain": float(g.mean()) if len(g) else None, "median_gain": float(np.median(g)) if len(g) else None,
        "gain_quartiles": [float(q) for q in np.percentile(g, [25, 75])] if len(g) else None,
        "gain_min": float(g.min()) if len(g) else None, "gain_max": float(g.max()) if len(g) else None,
        "improved": int((g > 0).sum()), "unchanged": int((g == 0).sum()), "worse": int((g < 0).sum()),
        "share_lose": float((g < 0).mean()) if len(g) else None,
    }
    return {
        "task": task.name,
        "client_is": p.client_is,
        "protocol": ("each client fine-tunes a copy of the released global model on its own training part ("
                     + settings.describe() + "), from the global model every time, and is scored on "
                     + ("the last 20% of its training part (validation: its held-out part is not used)"
                        if settings.validation else "its own held-out part") + ", before and after"),
        "guarantee": PERSONALIZATION_STATEMENT,
        "operator_only": "computed on the clients' data without noise; not covered by the guarantee",
        "settings": dataclasses.asdict(settings),
        "evaluated_on": "validation" if settings.validation else "held-out",
        "which_clients": subset,
        "excluded": p.excluded,
        "gain_is": (f"personalized minus global" if p.higher_is_better else
                    f"global minus personalized (lower {p.headline} is better)") + ": positive = personalization helps",
        "clients": names,
        "baseline_metrics": {m: [_clean(b.get(m)) for b in baseline] for m in metrics},
        "personalized_metrics": {m: [_clean(a.get(m)) for a in personal] for m in metrics},
        "gain": {m: [_clean(v) for v in vals] for m, vals in gain.items()},
        "summary": summary,
        "seconds": seconds,
    }


def to_columns(result: dict) -> dict[str, dict[str, float]]:
    """Per client: ``personalized_<metric>`` and ``personal_gain_<metric>`` (and ``<metric>``, the global model's
    value, for a client the held-out table has no row for), for operator/heldout_by_client.csv."""
    out = {}
    for i, name in enumerate(result["clients"]):
        row = {}
        for m in result["baseline_metrics"]:
            for prefix, src in (("", "baseline_metrics"), ("personalized_", "personalized_metrics"),
                                ("personal_gain_", "gain")):
                v = result[src][m][i]
                if v is not None:
                    row[prefix + m] = float(v)
        out[name] = row
    return out


def merge_by_client(by_client: dict, result: Optional[dict]) -> dict:
    """``by_client`` (client -> {column: value}) with the personalization columns added: rows of clients it has
    get ``personalized_*`` and ``personal_gain_*``; other clients (keyboard users: no per-client table) get a new
    row that also holds the global model's value. Earlier personalization columns are replaced."""
    out = {name: {k: v for k, v in row.items() if not k.startswith(("personalized_", "personal_gain_"))}
           for name, row in by_client.items()}
    if not result:
        return out
    for name, row in to_columns(result).items():
        if name in out:
            out[name].update({k: v for k, v in row.items() if k.startswith(("personalized_", "personal_gain_"))})
        else:
            out[name] = row
    return out


def summary_line(result: dict) -> str:
    s, m = result["summary"], result["summary"]["metric"]
    where = "validation part" if result["evaluated_on"] == "validation" else "held-out part"
    return (f"personalization ({result['settings']['steps']} steps, lr {result['settings']['learning_rate']:g}, "
            f"{result['settings']['layers']}; {result['which_clients']}, each on its own {where}, operator-only): "
            f"mean {m} {s['baseline_mean']:.4f} global -> {s['personalized_mean']:.4f} personalized; gain mean "
            f"{_signed(s['mean_gain'])}, median {_signed(s['median_gain'])}; improved {s['improved']}, unchanged "
            f"{s['unchanged']}, worse {s['worse']} ({_pct(s['share_lose'])} lose)"
            + (f"; {result['excluded']}" if result.get("excluded") else ""))


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.4f}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def write(out: str, result: dict) -> tuple[str, str]:
    """operator/personalization.json and .png (personalization_validation.* for a validation run)."""
    from tff_pipeline.io import atomic_write_text

    val = result["evaluated_on"] == "validation"
    path = operator_path(out, VALIDATION_JSON_NAME if val else JSON_NAME)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    png = plot(result, operator_path(out, VALIDATION_PNG_NAME if val else PNG_NAME))
    return path, png


def plot(result: dict, path: str) -> str:
    """The gain per client: one bar per hospital or sensor; a histogram over users for many clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tff_pipeline.io import save_figure

    s, m, who = result["summary"], result["summary"]["metric"], result["client_is"]
    pairs = [(n, g) for n, g in zip(result["clients"], result["gain"][m]) if g is not None]
    title = (f"{result['task']}: personalization gain in {m} per {who} "
             f"({result['settings']['steps']} steps, lr {result['settings']['learning_rate']:g}, "
             f"{result['settings']['layers']}; {'validation' if result['evaluated_on'] == 'validation' else 'held-out'})")
    note = (f"positive = personalization helps ({result['gain_is'].split(':')[0]}); mean {_signed(s['mean_gain'])}, "
            f"median {_signed(s['median_gain'])}, {s['worse']} of {s['clients']} lose. Operator-only.")
    if len(pairs) <= BAR_CHART_MAX:
        pairs.sort(key=lambda t: t[1])
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * max(len(pairs), 3)))
        ax.barh([n for n, _ in pairs], [g for _, g in pairs],
                color=["tab:green" if g > 0 else "tab:red" if g < 0 else "tab:gray" for _, g in pairs])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"gain in {m}")
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.hist([g for _, g in pairs], bins=30, color="tab:blue", alpha=0.8)
        ax.axvline(0, color="black", lw=0.8)
        if s["mean_gain"] is not None:
            ax.axvline(s["mean_gain"], color="tab:green", ls="--", label=f"mean {_signed(s['mean_gain'])}")
            ax.legend()
        ax.set_xlabel(f"gain in {m}")
        ax.set_ylabel(f"{who}s")
    ax.set_title(title, fontsize=9)
    fig.text(0.01, 0.005, note, fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, path)


class Personalize(Callback):
    """--personalize: after the final evaluation, personalizes ``run.keras_model`` (the released global model,
    left unchanged) on each evaluation client; writes operator/personalization.{json,png}, keeps the result in
    ``run.personalization`` (merge_by_client adds its columns to operator/heldout_by_client.csv) and logs one
    line."""

    def on_train_begin(self, run) -> None:
        if run.cfg.personalize and run.task.personalization is None:
            raise ConfigError(f"--personalize: task {run.task.name!r} has no per-client training and held-out "
                              f"parts; run without --personalize")

    def on_train_end(self, run) -> None:
        if not run.cfg.personalize:
            return
        if getattr(getattr(run, "stop", None), "signal", None):
            run.log(f"personalization skipped: the run was interrupted (scripts/personalize.py --run_dir={run.out} "
                    f"runs it on the finished run)")
            return
        settings = Settings.from_config(run.cfg)
        run.log(f"personalizing: each evaluation client fine-tunes the released model, {settings.describe()} ...")
        result = personalize(run.task, run.keras_model, settings)
        write(run.out, result)
        run.personalization = result
        run.log(summary_line(result) + f"; {operator_path(run.out, JSON_NAME)}")


def personalize_run_dir(run_dir: Optional[str], overrides: dict, validation: bool = False,
                        log: Callable[[str], None] = print) -> dict:
    """scripts/personalize.py: personalizes the final model of the finished run in ``run_dir`` with its settings
    and the --personalize_* ``overrides``; writes operator/personalization.{json,png} and (not for a validation
    run) the columns of operator/heldout_by_client.csv. Changes nothing the guarantee covers: not the model, not
    the privacy report."""
    import tasks

    from tff_pipeline import rundir

    saved, cfg = rundir.open_finished_run(run_dir)
    cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None})
    with progress.phase(f"loading the {cfg.task} data"):
        task = tasks.build(cfg)
    if task.personalization is None:
        raise ConfigError(f"--run_dir={run_dir}: task {task.name!r} has no per-client training and held-out parts")
    model = rundir.load_final_model(task, cfg, run_dir)
    settings = Settings.from_config(cfg, validation)
    log(f"personalizing {run_dir} ({task.name}): {settings.describe()} per client ...")
    result = personalize(task, model, settings)
    path, png = write(run_dir, result)
    if not validation:
        update_by_client_csv(run_dir, result)
    log(summary_line(result))
    log(f"written: {path}, {png}" + ("" if validation else
                                     f", {operator_path(run_dir, 'heldout_by_client.csv')}") + " (operator-only)")
    log(PERSONALIZATION_STATEMENT)
    return result


def update_by_client_csv(run_dir: str, result: dict) -> str:
    """operator/heldout_by_client.csv with this personalization's columns (earlier ones replaced)."""
    import csv

    from tff_pipeline.callbacks import write_by_client

    path = operator_path(run_dir, "heldout_by_client.csv")
    rows: dict = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                name = r.pop("client")
                rows[name] = {k: float(v) for k, v in r.items() if v not in ("", None)}
    write_by_client(path, merge_by_client(rows, result))
    return path
