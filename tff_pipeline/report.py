"""The privacy report: one JSON object and its Markdown rendering (the HTML pages: tff_pipeline.html_report).

Every number in it is re-derivable with dp_accounting from the recorded
fields: ``recorded_event`` is the exact DpEvent composed for the rounds run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from tff_pipeline.io import atomic_write_text, save_figure  # noqa: F401  (atomic_write_text re-exported)
from tff_pipeline.mechanisms.base import event_to_json

OTHER_DELTAS = (1e-4, 1e-5, 1e-6, 1e-7)


def _finite(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def pld_epsilon(mech, rounds: int, delta: Optional[float] = None) -> Optional[float]:
    """ε from the PLD accountant, a tighter cross-check; None where it does not support the event."""
    if not mech.is_private or rounds == 0:
        return None
    return mech.pld_epsilon(mech.training_event(rounds), mech.delta if delta is None else delta)


def build(
    mech,
    *,
    rounds_run: int,
    rounds_planned: int,
    unit: str,
    stop_reason: str,
    entries: Optional[list] = None,
    noise_calibration: Optional[dict] = None,
    releases: Optional[dict] = None,
    sampling_secret: bool = True,
    max_participations: Optional[int] = None,
    initialisation: Optional[str] = None,
    kind: str = "training run",
    per_client: Optional[dict] = None,
    rounds_accounted: Optional[int] = None,
) -> dict[str, Any]:
    """The report of a run (or, with kind="plan", of a planned run) of the mechanism ``mech``.

    ``entries``: the privacy ledger's lines; ε is the composition of their
    events (``mech.compose``). Without them (a plan), the ledger a run of
    ``rounds_accounted`` (default ``rounds_run``) rounds would write.
    ``releases``: train.release_notes (what the run directory holds).
    ``sampling_secret`` False: the cohorts came from a public seed;
    ``max_participations`` then gives ε without amplification."""
    if entries is None:
        entries = mech.planned_entries(rounds_run if rounds_accounted is None else rounds_accounted)
    client = mech.unit == "client"
    report: dict[str, Any] = {
        "kind": kind,
        "differentially_private": mech.is_private,
        "mechanism": mech.title,
        "mechanism_name": mech.name,
        "unit_of_privacy": "client (user level)" if client else "example (record level)",
        "client_is" if client else "example_is": unit,
        "neighbouring_relation": mech.relation_text,
        "accountant_relation": mech.relation.name,
        "sampling": mech.sampling_section(),
        "rounds_run": rounds_run,
        "rounds_planned": rounds_planned,
        "stop_reason": stop_reason,
        "noise_multiplier": mech.noise_multiplier,
        "noise_calibration": noise_calibration,
        **accounting(mech, entries),
        "sampling_secret": sampling_secret,
        "sampling_randomness": mech.sampling_randomness,
        "releases": releases,
        "not_covered": list((releases or {}).get("not_covered", ())) + list((releases or {}).get("not_counted", ())),
        "model_initialisation": initialisation or "random (no pre-training)",
        "mechanism_rows": [[k, str(v)] for k, v in mech.report_rows()],
        **mech.report_extras(entries),
    }
    if not sampling_secret and hasattr(mech, "known_sampling_epsilon"):
        report["max_participations"] = max_participations
        report["epsilon_known_sampling"] = mech.known_sampling_epsilon(max_participations or 0)
    if per_client:
        report["per_client"] = per_client
        report["epsilon_is"] = (
            "every client's: all clients sample with the same rate q, so their ε are equal"
            if getattr(mech, "sampling_rate", None) is not None else
            "the largest over clients: that of the client with the fewest examples (largest sampling rate q)")
    if client and mech.population <= 50:
        report["small_population_warning"] = small_population_warning(mech, unit)
    report["statement"] = statement(report, mech)
    return report


def accounting(mech, entries) -> dict[str, Any]:
    """ε (RDP, PLD, at other δ), ρ and the recorded event: the composition of the ledger's ``entries``."""
    n, private = len(entries), mech.is_private
    event = mech.compose(entries)
    eps, order = mech.epsilon_of(event) if n else ((0.0, None) if private else (math.inf, None))
    rho = mech.zcdp_rho(n, entries) if private and n else None
    return {
        "rounds_accounted": n,
        "delta": mech.delta,
        "epsilon": _finite(eps),
        "accountant": "dp_accounting RdpAccountant",
        "rdp_order": order,
        "epsilon_pld": _finite(mech.pld_epsilon(event, mech.delta)) if private and n else None,
        "zcdp_rho": rho,
        "zcdp_note": ("zCDP does not capture amplification by subsampling; the subsampled Gaussian is accounted "
                      "with RDP and PLD" if private and rho is None else None),
        "epsilon_at_other_delta": (
            {f"{d:g}": {"rdp": _finite(dataclasses.replace(mech, delta=d).epsilon_of(event)[0]),
                        "pld": _finite(mech.pld_epsilon(event, d))} for d in OTHER_DELTAS}
            if private and n else {}),
        "event_noise_multiplier": mech.event_noise_multiplier if private else None,
        "recorded_event": event_to_json(event),
    }


def small_population_warning(pcfg, unit: str) -> str:
    """What a client-level ε means when there are only a few clients."""
    n, q = pcfg.population, pcfg.sampling_probability
    # the share of the noise that lands on the updates
    z = getattr(pcfg, "update_noise_multiplier", pcfg.noise_multiplier)
    text = (f"Only {n} clients: client-level DP protects a whole client ({unit}), i.e. an adversary who sees the "
            f"model cannot tell whether that one client took part. ")
    if q >= 1:
        text += ("Every client is in every round (q = 1), so sampling amplifies nothing and ε grows roughly with "
                 "the square root of the rounds at a given noise; ")
    if z:
        text += (f"the noise added to the average update has a standard deviation of "
                 f"{z:.3g}/{pcfg.clients_per_round:g} = "
                 f"{z / max(pcfg.clients_per_round, 1e-12):.3g} times the clip norm in every coordinate, while a "
                 f"client's clipped update has at most the clip norm in total, so a small ε swamps the update "
                 f"and a large ε says little. ")
    text += ("Client-level DP fits hundreds of clients or more: at a fixed sampling rate and number of rounds the "
             "noise multiplier for a target ε does not depend on the population, so the noise on the average "
             "falls as 1/(clients per round); scripts/privacy_report.py --unit=client --population=N "
             "--clients_per_round=M --rounds=R --target_epsilon=E gives the noise a larger population would need. "
             "For cross-silo data the unit that often matters is the record (--privacy_unit=example, where the "
             "task supports it: medical records, traffic record blocks).")
    return text


def statement(r: dict[str, Any], mech) -> str:
    """A plain statement in the style of tensorflow-privacy's
    compute_dp_sgd_privacy_statement: what is protected, against which
    neighbouring relation, under which sampling assumption, what is not.
    The mechanism writes the sentence on how it ran (``mech.statement``)."""
    s = r["sampling"]
    example = r["unit_of_privacy"].startswith("example")
    plan = r.get("kind") == "plan"
    verb = "will satisfy" if plan else "satisfies"
    model = "A model trained this way" if plan else "This model"
    if not r["differentially_private"]:
        attentive = (r.get("aggregation") or {}).get("rule") == "attentive"
        how = ("attentive aggregation (FedAtt, Ji et al. 2019: updates weighted by a softmax over their distances "
               "to the server model, not clipped)" if attentive else "federated averaging")
        return (
            f"No differential privacy: --noise_multiplier=0, so no (ε, δ) guarantee holds for this model. "
            f"It was trained for {r['rounds_run']} rounds of {how}"
            + ("" if example else f"{'' if attentive else ' with clipped updates'} and "
                                  f"{s['clients_per_round']} clients per round out of {s['population']}") + "."
        )
    eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.4g}"
    if example:
        text = (f"{model} {verb} ({eps}, {r['delta']:g})-differential privacy at the example level: the protected "
                f"unit is one record ({r['example_is']}), and the neighbouring datasets differ by "
                f"{r['neighbouring_relation']}. ")
    else:
        text = (f"{model} {verb} ({eps}, {r['delta']:g})-differential privacy at the client level: the protected "
                f"unit is one client ({r['client_is']}), and the neighbouring datasets differ by "
                f"{r['neighbouring_relation']}. ")
    order = "" if r["rdp_order"] is None else f" (order {r['rdp_order']:g})"
    text += mech.statement(r, plan) + f". ε is computed by the RDP accountant of dp_accounting{order}"
    if r.get("epsilon_pld") is not None:
        text += f"; the PLD accountant gives ε = {r['epsilon_pld']:.4g} for the same event"
    text += mech.statement_tail(r)
    text += _randomness(r, mech)
    text += (". The guarantee covers everything computed from the noisy aggregates, including the final model"
             + (" and the clip norms" if mech.released_by_mechanism else "") + ".")
    return text + _context(r)


def _randomness(r: dict[str, Any], mech) -> str:
    """What the guarantee relies on being secret, or the warning that it is not (public sampling seed)."""
    text = ""
    secret = mech.secret_randomness(r.get("sampling_secret", True))
    if secret:
        text += f". The guarantee relies on randomness unknown to the adversary: {secret}"
    else:
        kmax = r.get("max_participations")
        ek = r.get("epsilon_known_sampling")
        text += (". WARNING: the cohorts were drawn from --public_sampling_seed, so they are NOT secret: ε above "
                 "holds only against an adversary who does not know that seed, and the seed is written in "
                 "config.json. Against one who knows it, there is no "
                 "amplification by sampling"
                 + (f": the client that took part most often ({kmax} round results) has ε = {ek:.4g}"
                    if ek is not None and kmax is not None else "") + ". Use it for research only")
    return text


def _context(r: dict[str, Any]) -> str:
    """The run's circumstances: re-run rounds, pre-training, the default target, small populations, releases."""
    text = ""
    extra = r.get("rounds_accounted", r["rounds_run"]) - r["rounds_run"]
    if extra > 0:
        text += (f" The run was resumed after a crash and {extra} round result(s) computed before it were lost and "
                 f"run again; they had been recorded in the privacy ledger (and may have been shown), so ε counts "
                 f"all {r['rounds_accounted']} round results, not only the {r['rounds_run']} in the model.")
    if r.get("model_initialisation", "").startswith("pre-trained"):
        text += (f" The starting model was {r['model_initialisation']}; that data is public, holds no client's "
                 f"data, and costs no privacy.")
    c = r.get("noise_calibration") or {}
    if c.get("task_default"):
        text += (f" No noise setting was given, so the task's default target ε = {c['target_epsilon']:g} was "
                 f"used.")
    if r.get("small_population_warning"):
        text += " " + r["small_population_warning"]
    rel = r.get("releases")
    if rel:
        text += (" " + rel["public"] + " Values computed from the data without noise are operator-only and not "
                 "covered: everything in operator/ and checkpoints/ (listed in the report).")
    elif r["not_covered"]:
        text += " Not covered: " + " ".join(r["not_covered"])
    return text


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


EPSILON_LABEL = "ε (RDP accountant)"  # the row of the table that states ε (the HTML page tags it id="epsilon")


def report_rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report's table as (label, value) rows: one list for the Markdown and the HTML renderings.
    Values may hold Markdown emphasis (``**no**``)."""
    s = r["sampling"]
    eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.4f}"
    example = r["unit_of_privacy"].startswith("example")
    rows = [
        ("Differentially private", "yes" if r["differentially_private"] else "**no** (noise multiplier 0)"),
        ("Mechanism", r["mechanism"]),
        ("Unit of privacy", f"{r['unit_of_privacy']}: {r.get('example_is') if example else r['client_is']}"),
        ("Neighbouring relation", r["neighbouring_relation"]),
        ("Sampling", f"{s['scheme']} — {s['description']}"),
        ("q", f"{s['q']:.6g}"),
    ]
    if not example:
        rows += [("Population (clients)", s["population"]), ("Clients per round", s["clients_per_round"])]
    rows += [
        ("Rounds run / planned", f"{r['rounds_run']} / {r['rounds_planned']}"),
        ("Round results accounted (privacy ledger)", f"{r.get('rounds_accounted', r['rounds_run'])}"),
        ("Stop reason", r["stop_reason"]),
        ("Model initialisation", r.get("model_initialisation", "")),
        ("Noise multiplier (total)", f"{r['noise_multiplier']:.6g}"),
    ]
    rows += [tuple(x) for x in r.get("mechanism_rows", ())]
    rows += [
        ("δ", f"{r['delta']:g}"),
        (EPSILON_LABEL, eps),
        ("Best RDP order", r["rdp_order"]),
        ("ε (PLD accountant, cross-check)", "n/a" if r["epsilon_pld"] is None else f"{r['epsilon_pld']:.4f}"),
        ("zCDP ρ", f"{r['zcdp_rho']:.6g}" if r.get("zcdp_rho") is not None else f"n/a ({r.get('zcdp_note') or 'no DP'})"),
    ]
    if r.get("tree_sizes"):
        rows.append(("Trees (steps each)", ", ".join(map(str, r["tree_sizes"]))))
    public = (f"**public** (--public_sampling_seed): ε without amplification for the most frequent client = "
              f"{_fmt(r.get('epsilon_known_sampling'))} ({r.get('max_participations')} round results)")
    if "sampling_randomness" not in r:  # a report written before the mechanism carried this row's text
        from tff_pipeline.mechanisms import REGISTRY

        cls = REGISTRY.get(r.get("mechanism_name", ""))
        r = {**r, "sampling_randomness": cls.sampling_randomness if cls else None}
    rows.append(("Sampling randomness", r.get("sampling_randomness")
                 or ("secret (operating system)" if r.get("sampling_secret", True) else public)))
    if r.get("noise_calibration"):
        c = r["noise_calibration"]
        rows.append(("Noise calibration", f"z calibrated for target ε = {c['target_epsilon']:g} over {c['rounds']} rounds"
                     + (" (the task's default: no noise flag was given)" if c.get("task_default") else "")))
    for k, v in (r.get("plan") or {}).items():
        rows.append((k, v))
    return rows


PER_CLIENT_HEAD = ("client", "examples", "q", "ε (RDP)")
OTHER_DELTA_HEAD = ("δ", "ε (RDP)", "ε (PLD)")


def per_client_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    """The per-client table (``PER_CLIENT_HEAD``); empty without per-client ε."""
    return [(k, str(c["examples"]), f"{c['q']:.4g}", _fmt(c["epsilon"])) for k, c in (r.get("per_client") or {}).items()]


def other_delta_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    """ε at other δ (``OTHER_DELTA_HEAD``); empty without DP."""
    return [(d, _fmt(e["rdp"]), _fmt(e["pld"])) for d, e in (r.get("epsilon_at_other_delta") or {}).items()]


def render_markdown(r: dict[str, Any]) -> str:
    out = ["# Privacy report", "", r["statement"], "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in report_rows(r)]
    if r.get("per_client"):
        out += ["", "## Per client", "", f"ε above is {r['epsilon_is']}.", "", "| " + " | ".join(PER_CLIENT_HEAD) + " |",
                "|---|---|---|---|"]
        out += ["| " + " | ".join(row) + " |" for row in per_client_rows(r)]
    if r["epsilon_at_other_delta"]:
        out += ["", "## ε at other δ", "", "| " + " | ".join(OTHER_DELTA_HEAD) + " |", "|---|---|---|"]
        out += ["| " + " | ".join(row) + " |" for row in other_delta_rows(r)]
    out += _releases_section(r)
    if r.get("empirical_audit"):
        out += ["", "## Empirical audit", "", f"With --audit: {r['empirical_audit']}."]
    out += _recompute_section(r)
    return "\n".join(out)


def recompute_code(r: dict[str, Any]) -> str:
    """Python that recomputes ε from the recorded DpEvent with dp_accounting alone."""
    return "\n".join([
        "import json, dp_accounting",
        "from dp_accounting.rdp import rdp_privacy_accountant as rdp",
        "from tff_pipeline.privacy import event_from_json",
        "r = json.load(open('privacy_report.json'))",
        "rel = dp_accounting.NeighboringRelation." + r.get("accountant_relation", "ADD_OR_REMOVE_ONE"),
        "acc = rdp.RdpAccountant(neighboring_relation=rel).compose(event_from_json(r['recorded_event']))",
        "print(acc.get_epsilon(r['delta']))",
    ])


def _recompute_section(r: dict[str, Any]) -> list[str]:
    """How to recompute ε from the recorded DpEvent with dp_accounting alone."""
    return ["", "## Recompute it yourself", "", "```python", recompute_code(r), "```", "", "Recorded DpEvent:", "",
            "```json", json.dumps(r["recorded_event"], indent=2), "```", ""]


def _releases_section(r: dict[str, Any]) -> list[str]:
    """What the run directory holds: covered, public by assumption, not covered, not counted."""
    out: list[str] = []
    rel = r.get("releases")
    if rel:
        out += ["", "## What this run directory holds", "", "Covered by the guarantee:", ""]
        out += [f"- {x}" for x in rel["covered"]]
        out += ["", f"Public by assumption: {rel['public']}", "",
                "**Not covered (operator-only: computed from private data without noise; do not release):**", ""]
        out += [f"- {x}" for x in rel["not_covered"]]
        out += ["", "Not counted:", ""] + [f"- {x}" for x in rel["not_counted"]]
    elif r["not_covered"]:
        out += ["", "## Not covered by the guarantee", ""] + [f"- {x}" for x in r["not_covered"]]
    return out


def write(directory: str, report: dict[str, Any]) -> None:
    atomic_write_text(os.path.join(directory, "privacy_report.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(os.path.join(directory, "privacy_report.md"), render_markdown(report))


def plot_run(metrics_csv: str, path: str, headline: str) -> str:
    """The operator's training curves at ``path``: ε spent, the adaptive clip
    norm and the held-out ``headline`` metric (not covered by the guarantee),
    each over rounds, on one page."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))

    def series(col):
        pts = [(int(r["round"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    x, y = series("epsilon")
    axes[0].plot(x, y, color="tab:red")
    axes[0].set_ylabel("ε spent (RDP)")
    axes[0].set_title("ε over rounds" if y else "ε over rounds: no DP (noise multiplier 0)")
    x, y = series("clip_norm")
    axes[1].plot(x, y, color="tab:blue")
    axes[1].set_ylabel("adaptive clip norm")
    col = f"eval_{headline}"
    x, y = series(col)
    axes[2].plot(x, y, marker="o", color="tab:green")
    axes[2].set_ylabel(headline)
    axes[2].set_xlabel("round (0 = after public pre-training)")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
