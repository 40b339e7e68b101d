"""The privacy report: one JSON object and its Markdown rendering.

Every number in it is re-derivable with dp_accounting from the recorded
fields: ``recorded_event`` is the exact DpEvent composed for the rounds run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Optional

from tff_pipeline import privacy
from tff_pipeline.privacy import PrivacyConfig

OTHER_DELTAS = (1e-4, 1e-5, 1e-6, 1e-7)


def atomic_write_text(path: str, text: str) -> None:
    """Write then rename: a crash leaves the old file or the new, never half."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def pld_epsilon(pcfg: PrivacyConfig, rounds: int) -> Optional[float]:
    """ε from the PLD accountant, a tighter cross-check; None where it does
    not support the event (sampling without replacement)."""
    if not pcfg.is_private or rounds == 0 or pcfg.sampling != "poisson":
        return None
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(privacy.training_event(pcfg, rounds))
    return float(acc.get_epsilon(pcfg.delta))


def build(
    pcfg: PrivacyConfig,
    *,
    rounds_run: int,
    rounds_planned: int,
    unit: str,
    stop_reason: str,
    noise_calibration: Optional[dict] = None,
    not_covered: tuple[str, ...] = (),
    initialisation: Optional[str] = None,
    mechanism: str = "DP-FedAvg with adaptive clipping (Andrew et al. 2021), TFF gaussian_adaptive aggregator",
) -> dict[str, Any]:
    eps, order = privacy.epsilon(pcfg, rounds_run)
    report: dict[str, Any] = {
        "differentially_private": pcfg.is_private,
        "mechanism": mechanism,
        "unit_of_privacy": "client (user level)",
        "client_is": unit,
        "neighbouring_relation": pcfg.neighboring_relation,
        "sampling": {
            "scheme": pcfg.sampling,
            "description": (
                "Poisson: each client joins each round independently with probability q"
                if pcfg.sampling == "poisson"
                else "fixed-size: exactly clients_per_round clients drawn uniformly without replacement"
            ),
            "q": pcfg.sampling_probability,
            "population": pcfg.population,
            "clients_per_round": pcfg.clients_per_round,
        },
        "rounds_run": rounds_run,
        "rounds_planned": rounds_planned,
        "stop_reason": stop_reason,
        "noise_multiplier": pcfg.noise_multiplier,
        "update_noise_multiplier": privacy.update_noise_multiplier(pcfg),
        "clipped_count_stddev": pcfg.effective_clipped_count_stddev,
        "noise_calibration": noise_calibration,
        "delta": pcfg.delta,
        "epsilon": _finite(eps),
        "accountant": "dp_accounting RdpAccountant",
        "rdp_order": order,
        "epsilon_pld": _finite(pld_epsilon(pcfg, rounds_run)) if pcfg.is_private else None,
        "epsilon_at_other_delta": (
            {f"{d:g}": _finite(privacy.epsilon(PrivacyConfig(**{**pcfg.__dict__, "delta": d}), rounds_run)[0])
             for d in OTHER_DELTAS}
            if pcfg.is_private else {}
        ),
        "recorded_event": privacy.event_to_json(privacy.training_event(pcfg, rounds_run)),
        "not_covered": list(not_covered),
        "model_initialisation": initialisation or "random (no pre-training)",
    }
    report["statement"] = statement(report)
    return report


def statement(r: dict[str, Any]) -> str:
    s = r["sampling"]
    if not r["differentially_private"]:
        return (
            f"No differential privacy: --noise_multiplier=0, so no (ε, δ) guarantee holds for this model. "
            f"It was trained for {r['rounds_run']} rounds of federated averaging with clipped updates and "
            f"{s['clients_per_round']} clients per round out of {s['population']}."
        )
    sampled = (
        f"each client took part in each round independently with probability q = {s['q']:.4g} (Poisson sampling)"
        if s["scheme"] == "poisson"
        else f"each round used exactly {s['clients_per_round']} of {s['population']} clients, drawn without replacement"
    )
    text = (
        f"This model satisfies ({r['epsilon']:.4g}, {r['delta']:g})-differential privacy at the client level: "
        f"the protected unit is one client ({r['client_is']}), and the neighbouring datasets differ by "
        f"{r['neighbouring_relation']}. It was trained with {r['mechanism']} for {r['rounds_run']} rounds, "
        f"where {sampled}, with noise multiplier {r['noise_multiplier']:.4g} on the clipped updates and the clipped-count "
        f"estimate together. ε is computed by the RDP accountant of dp_accounting (order {r['rdp_order']:g})"
    )
    if r.get("epsilon_pld") is not None:
        text += f"; the PLD accountant gives ε = {r['epsilon_pld']:.4g} for the same event"
    text += (
        ". The guarantee assumes the cohorts were sampled as stated, with randomness unknown to the adversary, "
        "and covers everything computed from the aggregated noisy updates, including the final model and "
        "the clip norms."
    )
    if r.get("model_initialisation", "").startswith("pre-trained"):
        text += (f" The starting model was {r['model_initialisation']}; that data is public, holds no client's "
                 f"data, and costs no privacy.")
    if r["not_covered"]:
        text += " Not covered: " + " ".join(r["not_covered"])
    return text


def render_markdown(r: dict[str, Any]) -> str:
    s = r["sampling"]
    eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.4f}"
    rows = [
        ("Differentially private", "yes" if r["differentially_private"] else "**no** (noise multiplier 0)"),
        ("Mechanism", r["mechanism"]),
        ("Unit of privacy", f"{r['unit_of_privacy']}: {r['client_is']}"),
        ("Neighbouring relation", r["neighbouring_relation"]),
        ("Sampling", f"{s['scheme']} — {s['description']}"),
        ("q", f"{s['q']:.6g}"),
        ("Population (clients)", s["population"]),
        ("Clients per round", s["clients_per_round"]),
        ("Rounds run / planned", f"{r['rounds_run']} / {r['rounds_planned']}"),
        ("Stop reason", r["stop_reason"]),
        ("Model initialisation", r.get("model_initialisation", "")),
        ("Noise multiplier (total)", f"{r['noise_multiplier']:.6g}"),
        ("Noise multiplier on updates", f"{r['update_noise_multiplier']:.6g}"),
        ("Clipped-count noise stddev", f"{r['clipped_count_stddev']:.6g}"),
        ("δ", f"{r['delta']:g}"),
        ("ε (RDP accountant)", eps),
        ("Best RDP order", r["rdp_order"]),
        ("ε (PLD accountant, cross-check)", "n/a" if r["epsilon_pld"] is None else f"{r['epsilon_pld']:.4f}"),
    ]
    if r.get("noise_calibration"):
        c = r["noise_calibration"]
        rows.append(("Noise calibration", f"z calibrated for target ε = {c['target_epsilon']:g} over {c['rounds']} rounds"))
    out = ["# Privacy report", "", r["statement"], "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    if r["epsilon_at_other_delta"]:
        out += ["", "## ε at other δ (RDP)", "", "| δ | ε |", "|---|---|"]
        out += [f"| {d} | {'∞' if e is None else f'{e:.4f}'} |" for d, e in r["epsilon_at_other_delta"].items()]
    if r["not_covered"]:
        out += ["", "## Not covered by the guarantee", ""] + [f"- {x}" for x in r["not_covered"]]
    out += [
        "",
        "## Recompute it yourself",
        "",
        "```python",
        "import json, dp_accounting",
        "from dp_accounting.rdp import rdp_privacy_accountant as rdp",
        "from tff_pipeline.privacy import event_from_json",
        "r = json.load(open('privacy_report.json'))",
        "rel = dp_accounting.NeighboringRelation." + ("ADD_OR_REMOVE_ONE" if s["scheme"] == "poisson" else "REPLACE_ONE"),
        "acc = rdp.RdpAccountant(neighboring_relation=rel).compose(event_from_json(r['recorded_event']))",
        "print(acc.get_epsilon(r['delta']))",
        "```",
        "",
        "Recorded DpEvent:",
        "",
        "```json",
        json.dumps(r["recorded_event"], indent=2),
        "```",
        "",
    ]
    return "\n".join(out)


def write(directory: str, report: dict[str, Any]) -> None:
    atomic_write_text(os.path.join(directory, "privacy_report.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(directory, "privacy_report.md"), render_markdown(report))
