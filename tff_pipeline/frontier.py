"""The privacy–utility frontier: one training per (target ε, seed) on the
same split, each with z calibrated for its ε by the run itself, plus the
lines a reader needs to judge them: the public-only start, the task's
n-gram or naive baselines on the same split, and the central ceiling (the
same model, pre-trained the same way, then trained centrally on the same
training clients' data without DP or federation).

Each training is a real training run (``tff_pipeline.train.run``, what
``scripts/train.py`` calls) in its own run directory, so every point has its
own privacy report; the points share one process. Rows go to
``frontier.csv``, the plot to ``frontier.png``, the table to ``frontier.md``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Optional

from tff_pipeline.config import ConfigError, TrainConfig
from tff_pipeline.io import atomic_write_text, save_figure



def parse_epsilons(text: str) -> list[float]:
    """"1,2,4,8,inf" -> [1, 2, 4, 8, inf]; inf = no DP (--noise_multiplier=0, asked for explicitly)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            e = float(part)
        except ValueError:
            e = -1.0
        if not (e > 0):
            raise ConfigError(f"--epsilons={text!r}: {part!r} is not a positive number or inf; e.g. 1,2,4,8,inf")
        out.append(e)
    if not out:
        raise ConfigError(f"--epsilons={text!r} names no ε; e.g. 1,2,4,8,inf")
    return out


def point_dir(base: str, epsilon: float, seed: int) -> str:
    return os.path.join(base, f"eps-{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}-seed-{seed}")


def point_config(cfg: TrainConfig, epsilon: float, seed: int, out: str) -> TrainConfig:
    """The frontier's settings with this ε (or no DP, asked for explicitly, for inf), seed and run directory."""
    private = not math.isinf(epsilon)
    return cfg.replace(target_epsilon=epsilon if private else None, noise_multiplier=None if private else 0.0,
                       max_epsilon=None, seed=seed, output_dir=out)


def train_args(cfg: TrainConfig, epsilon: float, seed: int, out: str) -> list[str]:
    """scripts/train.py's flags for one point (the same run as ``point_config``'s)."""
    flat = point_config(cfg, epsilon, seed, out).to_json()
    return [f"--{k}={v}" for k, v in flat.items() if v is not None]


def run_point(cfg: TrainConfig, epsilon: float, seed: int, base: str, log: Callable[[str], None]) -> dict:
    """Trains one point (resuming or skipping a finished one) and returns its row. The training is
    ``tff_pipeline.train.run`` in this process, exactly as ``scripts/train.py`` runs it with ``train_args``'
    flags: a new run, or the rest of an interrupted one (its resume check refuses changed settings). One process
    for every point spares each one TensorFlow's and TFF's imports and a new TFF worker."""
    out = point_dir(base, epsilon, seed)
    tag = f"[ε={epsilon:g} seed {seed}]"
    args = train_args(cfg, epsilon, seed, out)
    if finished(out, args):
        log(f"{tag} already trained in {out} with these settings; reading it")
        return read_point(out, epsilon, seed)
    import tensorflow as tf

    from tff_pipeline import train

    tf.keras.backend.clear_session()  # the previous point's Keras state and layer names go, as in a new process
    summary = train.run(point_config(cfg, epsilon, seed, out), log=lambda line: log(f"{tag} {line}"))
    if summary.get("interrupted"):
        raise Interrupted(f"{tag} stopped by a signal after round {summary.get('rounds_run')}; the same command "
                          f"resumes it")
    return read_point(out, epsilon, seed)  # its wall time is the run's own (summary.json), read or trained


class Interrupted(Exception):
    """A point's training was stopped by SIGINT/SIGTERM (its run directory resumes)."""


def finished(out: str, args: list[str]) -> bool:
    """Whether ``out`` holds a run that completed all its rounds with exactly these flags."""
    try:
        with open(os.path.join(out, "operator", "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(out, "config.json")) as f:
            saved = json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        return False
    # A signal in the last round marks the summary interrupted but the run is complete (its stop reason says so).
    done = summary.get("stop_reason") == "completed all planned rounds"
    wanted = dict(a[2:].split("=", 1) for a in args)
    return done and all(str(saved.get(k)) == v for k, v in wanted.items())


def read_point(out: str, epsilon: float, seed: int) -> dict:
    with open(os.path.join(out, "privacy_report.json")) as f:
        rep = json.load(f)
    with open(os.path.join(out, "operator", "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        conf = json.load(f)
    row = {"target_epsilon": epsilon, "seed": seed,
           "epsilon_rdp": rep["epsilon"] if rep["epsilon"] is not None else math.inf,
           "epsilon_pld": rep.get("epsilon_pld"), "noise_multiplier": rep["noise_multiplier"],
           "rounds": rep["rounds_run"],
           # example level: every client in every round (its --clients_per_round is not used)
           "clients_per_round": (len(rep["per_client"]) if rep.get("per_client") else
                                 conf["config"]["clients_per_round"]),
           "wall_s": summary.get("seconds_total"), "run_dir": out, "headline_metric": summary["headline_metric"]}
    row.update({k: v for k, v in summary["eval"].items()})
    pre = summary.get("public_pretraining") or {}
    row["public_only"] = pre.get("eval", {})
    row["baselines"] = (summary.get("baselines") or {}).get("baselines_this_split", {})
    return row


def central_ceiling(cfg: TrainConfig, epochs: int, log: Callable[[str], None]) -> dict[str, float]:
    """The same model (pre-trained on public data as the runs are) trained centrally, without DP or federation,
    on all the training clients' data for ``epochs`` passes; its held-out metrics."""
    import numpy as np
    import tensorflow as tf

    import tasks
    from tff_pipeline import dp_fedavg, train

    tf.keras.backend.clear_session()  # the last point's Keras state goes, as before every point
    full = cfg.replace(max_client_examples=10**9, local_epochs=1)
    task = tasks.build(full)
    tf.keras.utils.set_random_seed(cfg.seed)
    model = dp_fedavg.build_keras_model(task, ())
    if cfg.public_pretrain_epochs and task.public_data is not None:
        train.pretrain_on_public_data(task, full, model, log)
    dp_fedavg.set_frozen(model, (), phase="public")  # central: every weight trains
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=task.loss())
    for epoch in range(1, epochs + 1):
        t0 = time.monotonic()
        parts = [task.client_dataset(i, cfg.seed * 1_000_003 + epoch).unbatch() for i in range(task.population)]
        ds = parts[0]
        for p in parts[1:]:
            ds = ds.concatenate(p)
        hist = model.fit(ds.shuffle(200_000, seed=epoch).batch(32), epochs=1, verbose=0)
        log(f"central ceiling: epoch {epoch}/{epochs} ({time.monotonic() - t0:.0f} s): "
            f"loss {hist.history['loss'][-1]:.4f}")
    ev = task.evaluate(model).overall
    log(f"central ceiling: {task.headline_metric} {ev[task.headline_metric]:.4f}")
    return {k: float(v) for k, v in ev.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean and spread (min, max) over seeds of each target ε."""
    out = []
    for eps in dict.fromkeys(r["target_epsilon"] for r in rows):
        group = [r for r in rows if r["target_epsilon"] == eps]
        s = {"target_epsilon": eps, "seeds": len(group)}
        for k in ("epsilon_rdp", "epsilon_pld", "noise_multiplier", "rounds", "clients_per_round", "wall_s"):
            vals = [r[k] for r in group if r.get(k) is not None]
            s[k] = statistics.mean(vals) if vals else None
        for m in metrics:
            vals = [r[m] for r in group if m in r]
            s[m] = statistics.mean(vals) if vals else None
            s[m + "_min"], s[m + "_max"] = (min(vals), max(vals)) if vals else (None, None)
        out.append(s)
    return out


def reference_lines(rows: list[dict], headline: str, ceiling: Optional[dict]) -> dict[str, float]:
    """Public-only (mean over seeds), the baselines on this split that measure the headline metric, and the
    central ceiling."""
    lines = {}
    pub = [r["public_only"][headline] for r in rows if headline in r.get("public_only", {})]
    if pub:
        lines["public-only"] = statistics.mean(pub)
    from tff_pipeline.task import matching_baselines

    for k in matching_baselines(headline, rows[0].get("baselines") if rows else {}):
        lines[k] = statistics.mean([r["baselines"][k] for r in rows if k in r.get("baselines", {})])
    if ceiling and headline in ceiling:
        lines["central ceiling (no DP)"] = ceiling[headline]
    return lines


def write(base: str, rows: list[dict], summary: list[dict], lines: dict[str, float], headline: str,
          metrics: list[str], meta: dict[str, Any]) -> list[str]:
    """frontier.csv (one row per run), frontier_summary.csv (per ε), frontier.md, frontier.png and
    frontier.json; returns the paths."""
    os.makedirs(base, exist_ok=True)
    cols = ["target_epsilon", "seed", "epsilon_rdp", "epsilon_pld", "noise_multiplier", "rounds",
            "clients_per_round", *metrics, "wall_s"]
    paths = [os.path.join(base, n) for n in ("frontier.csv", "frontier_summary.csv", "frontier.md",
                                                 "frontier.png", "frontier.json")]
    _write_csv(paths[0], cols, rows)
    scols = ["target_epsilon", "seeds", "epsilon_rdp", "epsilon_pld", "noise_multiplier", "rounds",
             "clients_per_round", *[c for m in metrics for c in (m, m + "_min", m + "_max")], "wall_s"]
    _write_csv(paths[1], scols, summary)
    atomic_write_text(paths[2], markdown(summary, lines, headline, metrics, meta))
    plot(paths[3], rows, summary, lines, headline)
    atomic_write_text(paths[4], json.dumps({"meta": meta, "rows": rows, "summary": summary, "lines": lines},
                                           indent=2, default=str) + "\n")
    return paths


def write_point_pages(base: str, rows: list[dict]) -> None:
    """Rewrites each point's HTML privacy report, whose operator copy now shows the frontier."""
    from tff_pipeline import html_report

    for r in rows:
        with open(os.path.join(r["run_dir"], "privacy_report.json")) as f:
            html_report.write_pages(r["run_dir"], json.load(f), frontier_dir=base)


def _write_csv(path: str, cols: list[str], rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in cols})
    atomic_write_text(path, buf.getvalue())


def table(summary: list[dict], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """The per-ε table as (header, rows of formatted cells): for frontier.md and the operator's HTML report."""
    head = ["target ε", "ε (RDP)", "ε (PLD)", "z", "rounds", "clients/round", *metrics, "wall s"]

    def f(v, fmt="{:.4g}"):
        return "—" if v is None else ("∞" if isinstance(v, float) and math.isinf(v) else fmt.format(v))

    rows = []
    for s in summary:
        cells = [f(s["target_epsilon"], "{:g}"), f(s["epsilon_rdp"]), f(s["epsilon_pld"]),
                 f(s["noise_multiplier"]), f(s["rounds"], "{:.0f}"), f(s["clients_per_round"], "{:.0f}")]
        cells += [f"{f(s[m])} [{f(s[m + '_min'])}, {f(s[m + '_max'])}]" for m in metrics]
        cells.append(f(s["wall_s"], "{:.0f}"))
        rows.append(cells)
    return head, rows


def markdown(summary: list[dict], lines: dict[str, float], headline: str, metrics: list[str],
             meta: dict[str, Any]) -> str:
    head, rows = table(summary, metrics)
    out = [f"Frontier of {meta.get('task')} ({meta.get('date')}, commit {meta.get('commit')}); mean over "
           f"{meta.get('seeds')} seed(s), [min, max] beside each metric.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    out += ["", "Reference lines (" + headline + "): " + "; ".join(f"{k} {v:.4f}" for k, v in lines.items())]
    return "\n".join(out) + "\n"


def plot(path: str, rows: list[dict], summary: list[dict], lines: dict[str, float], headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [s for s in summary if not math.isinf(s["target_epsilon"])]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if finite:
        xs = [s["epsilon_rdp"] for s in finite]
        ax.errorbar(xs, [s[headline] for s in finite],
                    yerr=[[s[headline] - s[headline + "_min"] for s in finite],
                          [s[headline + "_max"] - s[headline] for s in finite]],
                    marker="o", capsize=3, label="DP federated (mean, min–max over seeds)")
        ax.scatter([r["epsilon_rdp"] for r in rows if not math.isinf(r["target_epsilon"])],
                   [r[headline] for r in rows if not math.isinf(r["target_epsilon"])], s=8, alpha=0.4)
        ax.set_xscale("log")
    for s in summary:
        if math.isinf(s["target_epsilon"]):
            lines = {**lines, "federated, no DP (ε = ∞)": s[headline]}
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1))]
    for (name, v), ls in zip(lines.items(), styles * 3):
        ax.axhline(v, linestyle=ls, color="grey" if "ceiling" not in name else "black", linewidth=1,
                   label=f"{name} {v:.4f}")
    ax.set_xlabel("ε (RDP accountant, δ as configured)")
    ax.set_ylabel(headline)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
