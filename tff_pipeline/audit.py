"""Empirical privacy audit: attacks that try to break the accountant's ε.

tensorflow-privacy 0.9.0's wheel does not ship its ``privacy_tests`` package
(membership inference, secret sharer, ε lower bounds; see BUILD_NOTES.md), so
the same published methods are implemented here with numpy/scipy:

* Membership inference by loss threshold (Yeom et al. 2018,
  https://arxiv.org/abs/1709.01604) on scores the task provides (the
  keyboard task calibrates each client's loss by its own held-out text,
  Watson et al. 2022), one score per client because the unit of privacy is
  the client: attack AUC and advantage max(TPR - FPR).
* An ε lower bound from the attack's error rates (Jagielski et al. 2020,
  https://arxiv.org/abs/2006.07709; Nasr et al. 2021): an (ε, δ)-DP mechanism
  forces TPR <= e^ε FPR + δ for every threshold, so
  ε >= log((TPR - δ) / FPR), evaluated with Clopper-Pearson confidence bounds
  so the lower bound holds with the stated confidence; the threshold is
  picked on one half of the data and the bound computed on the other.
* Secret-sharer exposure of inserted canaries (Carlini et al. 2019,
  https://arxiv.org/abs/1802.08232): exposure = log2|R| - log2 rank, with the
  rank among random reference phrases of the same format, and an estimate
  beyond the reference set from a skew-normal fit (as in tensorflow-privacy).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np


def roc(member_scores: np.ndarray, nonmember_scores: np.ndarray):
    """Attack predicts 'member' when score >= t (scores: higher = more member-like).
    Returns (fpr, tpr, tp counts, fp counts) over all thresholds."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    thresholds = np.unique(np.concatenate([m, n, [np.inf]]))[::-1]
    tp = np.array([(m >= t).sum() for t in thresholds])
    fp = np.array([(n >= t).sum() for t in thresholds])
    return fp / len(n), tp / len(m), tp, fp


def auc(member_scores, nonmember_scores) -> float:
    """Probability that a random member scores above a random non-member (ties count half)."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    greater = (m[:, None] > n[None, :]).mean()
    ties = (m[:, None] == n[None, :]).mean()
    return float(greater + 0.5 * ties)


def _clopper_pearson(k: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy.stats import beta

    k = np.asarray(k, float)
    lo = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
    hi = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lo, hi


def _bounds_at(m, n, t, delta, alpha):
    """ε proven at threshold t by Clopper-Pearson bounds on TPR and FPR."""
    tp, fp = int((m >= t).sum()), int((n >= t).sum())
    tpr_lo, tpr_hi = (float(v) for v in _clopper_pearson(np.array([tp]), len(m), alpha))
    fpr_lo, fpr_hi = (float(v) for v in _clopper_pearson(np.array([fp]), len(n), alpha))
    best = 0.0
    # TPR <= e^ε FPR + δ, and TNR <= e^ε FNR + δ: lower-bound the left, upper-bound the right.
    for num, den in ((tpr_lo - delta, fpr_hi), (1 - fpr_hi - delta, 1 - tpr_lo)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def epsilon_lower_bound(member_scores, nonmember_scores, delta: float, confidence: float = 0.95,
                        seed: int = 0) -> float:
    """An ε that the attack proves with the given confidence. The threshold is
    chosen on a random half of the members and non-members, and the bound is
    computed on the other half only (choosing it on the same data would
    overstate it); TPR and FPR get two-sided Clopper-Pearson intervals. 0 when
    nothing is proven."""
    m, n = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(m) < 4 or len(n) < 4:
        return 0.0
    rng = np.random.default_rng([seed, 0xEB])
    pm, pn = rng.permutation(len(m)), rng.permutation(len(n))
    m_sel, m_eval = m[pm[: len(m) // 2]], m[pm[len(m) // 2 :]]
    n_sel, n_eval = n[pn[: len(n) // 2]], n[pn[len(n) // 2 :]]
    alpha = 1 - confidence
    candidates = np.unique(np.concatenate([m_sel, n_sel]))
    if not len(candidates):
        return 0.0
    t = max(candidates, key=lambda t: _bounds_at(m_sel, n_sel, t, delta, alpha))
    return _bounds_at(m_eval, n_eval, t, delta, alpha)


def membership_inference(member_scores, nonmember_scores, delta: float, confidence: float = 0.95,
                         attack: str = "loss threshold (Yeom et al. 2018), one score per client") -> dict[str, Any]:
    fpr, tpr, _, _ = roc(member_scores, nonmember_scores)
    return {
        "attack": attack,
        "members": int(len(member_scores)),
        "non_members": int(len(nonmember_scores)),
        "auc": auc(member_scores, nonmember_scores),
        "advantage": float(np.max(tpr - fpr)),
        "epsilon_lower_bound": epsilon_lower_bound(member_scores, nonmember_scores, delta, confidence),
        "confidence": confidence,
    }


def exposure(canary_log_perplexity: float, reference_log_perplexities: np.ndarray,
             space_size_log2: float) -> dict[str, float]:
    """Secret-sharer exposure of one canary (Carlini et al. 2019).

    rank: 1 + number of references the model finds at least as likely.
    exposure_rank = log2(#references + 1) - log2(rank) (bounded by the reference count);
    exposure_extrapolated = -log2 P(reference <= canary) under a skew-normal fit,
    capped at log2 of the size of the canary space."""
    from scipy.stats import skewnorm

    ref = np.asarray(reference_log_perplexities, float)
    rank = 1 + int((ref <= canary_log_perplexity).sum())
    rank_exposure = math.log2(len(ref) + 1) - math.log2(rank)
    params = skewnorm.fit(ref)
    cdf = float(skewnorm.cdf(canary_log_perplexity, *params))
    extrapolated = space_size_log2 if cdf <= 0 else min(space_size_log2, -math.log2(cdf))
    return {"rank": rank, "references": int(len(ref)), "exposure_rank": rank_exposure,
            "exposure_extrapolated": extrapolated, "max_exposure": space_size_log2}


def run(task, model, participated: np.ndarray, seed: int, delta: float, accountant_epsilon) -> dict[str, Any]:
    """All attacks the task supports against ``model``; a JSON-able summary."""
    if task.audit is None:
        from tff_pipeline.config import ConfigError

        raise ConfigError(f"--audit: task {task.name!r} has no audit; run without --audit")
    s = task.audit(model, np.asarray(participated), seed)
    out: dict[str, Any] = {
        "accountant_epsilon": accountant_epsilon,
        "delta": delta,
        "membership_inference": membership_inference(s["member_scores"], s["nonmember_scores"], delta,
                                                     **({"attack": s["attack"]} if "attack" in s else {})),
        "members_are": "training clients that took part in at least one round",
        "non_members_are": "unseen clients (never trained on)",
    }
    if "canaries" in s:
        rows = []
        for c, lp in zip(s["canaries"], s["canary_log_perplexity"]):
            rows.append({**c, "log_perplexity": float(lp),
                         **exposure(float(lp), s["reference_log_perplexity"], s["canary_space_log2"])})
        out["canaries"] = rows
        out["canary_exposure_mean"] = float(np.mean([r["exposure_extrapolated"] for r in rows]))
        out["canary_exposure_rank_mean"] = float(np.mean([r["exposure_rank"] for r in rows]))
    lb = out["membership_inference"]["epsilon_lower_bound"]
    out["consistent_with_accountant"] = accountant_epsilon is None or lb <= accountant_epsilon
    return out


POINTER = ("operator-only: see operator/audit.json (attack scores computed on private data without noise, not "
           "covered by the guarantee, so not part of this report)")


def render_text(a: dict[str, Any]) -> str:
    mi = a["membership_inference"]
    eps = "∞ (no DP)" if a["accountant_epsilon"] is None else f"{a['accountant_epsilon']:.4f}"
    lines = [f"membership inference: AUC {mi['auc']:.4f}, advantage {mi['advantage']:.4f}, ε lower bound "
             f"{mi['epsilon_lower_bound']:.4f} ({mi['confidence']:.0%} confidence) vs accountant ε {eps}: "
             + ("consistent" if a["consistent_with_accountant"] else "INCONSISTENT")]
    if a.get("canaries"):
        lines.append(f"canaries: mean exposure {a['canary_exposure_mean']:.2f} bits (extrapolated), "
                     f"{a['canary_exposure_rank_mean']:.2f} bits (rank among {a['canaries'][0]['references']} "
                     f"references), of at most {a['canaries'][0]['max_exposure']:.1f}")
    return "\n".join(lines)


def audit_run_dir(run_dir: Optional[str]) -> dict[str, Any]:
    """Rebuilds a run's task and model from its directory and audits it."""
    import json
    import os

    from tff_pipeline import checkpoint, report, rundir, train
    from tff_pipeline.config import ConfigError
    from tff_pipeline.io import atomic_write_text

    saved, cfg = rundir.open_finished_run(run_dir)
    with open(os.path.join(run_dir, "privacy_report.json")) as f:
        rep = json.load(f)
    if saved.get("privacy_unit") != "client":
        raise ConfigError(f"--run_dir={run_dir}: the audit attacks client-level runs; this run protects "
                          f"{saved.get('privacy_unit')!r} units")
    participation = checkpoint.Participation(os.path.join(run_dir, train.OPERATOR_DIR, "participation.jsonl"))
    if not os.path.exists(participation.path):
        raise ConfigError(f"--run_dir={run_dir} has no {participation.path} (the record of who took part, written "
                          f"by this version's runs); audit a run made with this version")
    import tasks

    task = tasks.build(cfg)
    if task.audit is None:
        raise ConfigError(f"--run_dir={run_dir}: task {task.name!r} has no membership-inference audit (only keyboard "
                          f"at the client level has one)")
    model = rundir.load_final_model(task, cfg, run_dir)
    a = run(task, model, participation.clients(), cfg.seed, float(saved["privacy"]["delta"]), rep["epsilon"])
    atomic_write_text(train.operator_path(run_dir, "audit.json"), json.dumps(a, indent=2) + "\n")
    rep["empirical_audit"] = POINTER
    if rep.get("releases") and train.AUDIT_NOT_COVERED not in rep["releases"]["not_covered"]:
        rep["releases"]["not_covered"].append(train.AUDIT_NOT_COVERED)
        rep["not_covered"].insert(len(rep["releases"]["not_covered"]) - 1, train.AUDIT_NOT_COVERED)
    report.write(run_dir, rep)
    from tff_pipeline import html_report

    html_report.write_pages(run_dir, rep)  # the operator copy now shows the audit
    return a
