"""How much can knowing the hospital add to the medical task? (issue 18: why per-hospital personalization rarely
beats the global model on 3 of 4 hospitals.)

On each of --splits splits (the task's own stratified 75/25 split of seeds 0, 1, ...), L2-regularised logistic
regressions on the task's fixed encoding (tasks/medical.OneHotFeatures' columns), trained centrally without DP:
  pooled       one model on every hospital's training records (what a global model can reach);
  pooled+site  the same with a one-hot of the hospital as extra inputs (the global model told the site);
  local        one model per hospital on its own records only;
  site bias    the pooled model with its bias refit on each hospital's own training records (a prior shift);
and, for scale, how well the features alone tell the hospital (a multinomial regression, test records).
Prints each hospital's mean test accuracy and, per split, how many hospitals beat the pooled model.

  python scripts/medical_site_effect.py [--splits=10 --l2=1.0]

An operator's diagnostic on the pooled records of all hospitals (no DP): nothing here is released by a run.
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

import numpy as np
from absl import flags

from tff_pipeline import cli

flags.DEFINE_integer("splits", 10, "How many splits (seeds 0 .. splits-1 of the task's 75/25 split).")
flags.DEFINE_float("l2", 1.0, "L2 penalty on the weights (not the bias), summed over records as in the log loss.")
FLAGS = flags.FLAGS

MODELS = ("pooled", "pooled+site", "local", "site bias")


def _fit(x, y, l2, classes=None):
    """Logistic (or, with ``classes``, multinomial) regression by L-BFGS: weights [features, k] and bias [k]."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    k = classes or 1
    target = np.eye(k)[y.astype(int)] if classes else y[:, None]

    def loss(theta):
        w, b = theta[:-k].reshape(x.shape[1], k), theta[-k:]
        z = x @ w + b
        if classes:
            lse = logsumexp(z, axis=1, keepdims=True)
            p, value = np.exp(z - lse), np.sum(lse[:, 0] - np.sum(target * z, 1))
        else:
            p, value = 1 / (1 + np.exp(-z)), np.sum(np.logaddexp(0, z) - target * z)
        grad_z = p - target
        return (value + 0.5 * l2 * np.sum(w * w),
                np.concatenate([(x.T @ grad_z + l2 * w).ravel(), grad_z.sum(0)]))

    theta = minimize(loss, np.zeros(x.shape[1] * k + k), jac=True, method="L-BFGS-B").x
    return theta[:-k].reshape(x.shape[1], k), theta[-k:]


def _accuracy(z, y):
    return float(np.mean((z[:, 0] > 0) == (y > 0.5)))


def measure(splits: int, l2: float) -> dict:
    """Per model, a [splits, hospitals] array of test accuracies; ``site_predict``: the share of each hospital's
    test records whose hospital the features alone predict."""
    from scipy.optimize import minimize_scalar

    from tasks import medical

    onehot = medical.OneHotFeatures()
    out = {m: [] for m in (*MODELS, "site_predict")}
    names = None
    for seed in range(splits):
        clients = medical.load(seed)
        names = [c["name"] for c in clients]
        h = len(clients)
        enc = lambda x: onehot(x.astype(np.float32)).numpy().astype(np.float64)
        xs = [enc(c["train"][0]) for c in clients]
        ys = [c["train"][1].astype(np.float64) for c in clients]
        xt = [enc(c["test"][0]) for c in clients]
        yt = [c["test"][1] for c in clients]
        site = lambda i, n: np.tile(np.eye(h)[i], (n, 1))
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        s_all = np.concatenate([site(i, len(x)) for i, x in enumerate(xs)])
        w, b = _fit(x_all, y_all, l2)
        ws, bs = _fit(np.concatenate([x_all, s_all], 1), y_all, l2)
        wh, bh = _fit(x_all, np.concatenate([np.full(len(x), i) for i, x in enumerate(xs)]), l2, classes=h)
        rows = {m: [] for m in out}
        for i in range(h):
            rows["pooled"].append(_accuracy(xt[i] @ w + b, yt[i]))
            rows["pooled+site"].append(_accuracy(np.concatenate([xt[i], site(i, len(xt[i]))], 1) @ ws + bs, yt[i]))
            wl, bl = _fit(xs[i], ys[i], l2)
            rows["local"].append(_accuracy(xt[i] @ wl + bl, yt[i]))
            z = (xs[i] @ w + b)[:, 0]
            shift = minimize_scalar(lambda s: np.sum(np.logaddexp(0, z + s) - ys[i] * (z + s))).x
            rows["site bias"].append(_accuracy(xt[i] @ w + b + shift, yt[i]))
            rows["site_predict"].append(float(np.mean(np.argmax(xt[i] @ wh + bh, 1) == i)))
        for m in out:
            out[m].append(rows[m])
    return {"hospitals": names, **{m: np.asarray(v) for m, v in out.items()}}


def render(result: dict) -> str:
    names, pooled = result["hospitals"], result["pooled"]
    n = len(pooled)
    lines = [f"test accuracy per hospital, mean over {n} split(s) (seeds 0-{n - 1}); logistic regression, "
             f"central, no DP",
             "| model | " + " | ".join(names) + " | mean | hospitals above pooled, per split | splits with >= 3 "
             "above | mean gain over pooled |",
             "|---|" + "---|" * (len(names) + 4)]
    for m in MODELS:
        acc = result[m]
        cells = " | ".join(f"{v:.3f}" for v in acc.mean(0))
        if m == "pooled":
            lines.append(f"| {m} | {cells} | {acc.mean():.3f} | | | |")
            continue
        above = (acc > pooled + 1e-9).sum(1)
        lines.append(f"| {m} | {cells} | {acc.mean():.3f} | {' '.join(str(int(a)) for a in above)} | "
                     f"{int((above >= 3).sum())} of {n} | {np.mean(acc - pooled):+.4f} |")
    site = result["site_predict"]
    lines.append(f"| the hospital told by the features (share of test records) | "
                 + " | ".join(f"{v:.3f}" for v in site.mean(0)) + f" | {site.mean():.3f} | | | |")
    return "\n".join(lines)


def main(argv):
    cli.check_no_extra_args(argv)
    if FLAGS.splits < 1:
        raise cli.UserError(f"--splits={FLAGS.splits}: need at least 1")
    if not FLAGS.l2 > 0:
        raise cli.UserError(f"--l2={FLAGS.l2}: must be positive (it keeps the separable small hospitals finite)")
    print(render(measure(FLAGS.splits, FLAGS.l2)))
    return 0


if __name__ == "__main__":
    cli.main(main)
