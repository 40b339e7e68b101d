"""Privacy planning without training: forward (settings -> ε), backward
(target ε -> noise multiplier, or -> rounds affordable), and re-deriving ε of
an existing run from its recorded DpEvent. Never imports TensorFlow or TFF.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from tff_pipeline import privacy, report
from tff_pipeline.config import ConfigError
from tff_pipeline.mechanisms import DPFTRL, REGISTRY
from tff_pipeline.privacy import ExampleLevelConfig, PrivacyConfig, PrivacyConfigError


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    mechanism: Optional[str] = None  # None: dp_fedavg at unit=client, dp_sgd at unit=example
    unit: str = "client"
    population: Optional[int] = None
    clients_per_round: Optional[int] = None
    sampling_probability: Optional[float] = None
    sampling: str = "poisson"
    noise_multiplier: Optional[float] = None
    rounds: Optional[int] = None
    delta: float = 1e-5
    target_epsilon: Optional[float] = None
    clipped_count_stddev: Optional[float] = None
    examples_per_client: Optional[int] = None
    batch_size: Optional[int] = None
    local_steps: Optional[int] = None


def _need(value, flag: str, why: str):
    if value is None:
        raise ConfigError(f"--{flag} is required {why}")
    return value


def _normalise(req: PlanRequest) -> PlanRequest:
    """--mechanism sets the unit (--unit defaults to client)."""
    if req.mechanism is not None and req.mechanism not in REGISTRY:
        raise ConfigError(f"--mechanism={req.mechanism!r} must be one of {', '.join(REGISTRY)}")
    if req.mechanism is not None and REGISTRY[req.mechanism].unit != req.unit:
        if req.unit != "client":
            raise ConfigError(f"--mechanism={req.mechanism} protects one {REGISTRY[req.mechanism].unit}; drop "
                              f"--unit={req.unit}")
        req = dataclasses.replace(req, unit=REGISTRY[req.mechanism].unit)
    return req


def _config_factory(req: PlanRequest, searching: bool = False):
    """z -> the privacy config of the request (client or example level).
    While searching for z, the adaptive-clipping bound on z is not checked
    (the DpEvent does not depend on σ_b); the answer is checked after."""
    if req.mechanism == "dp_ftrl":
        why = "with --mechanism=dp_ftrl"
        pop = _need(req.population, "population", why)
        cpr = _need(req.clients_per_round, "clients_per_round", why)
        return lambda z: DPFTRL(pop, cpr, z, req.delta)
    if req.unit == "example":
        why = "with --unit=example"
        n = _need(req.examples_per_client, "examples_per_client", why)
        b = _need(req.batch_size, "batch_size", why)
        k = _need(req.local_steps, "local_steps", why)
        return lambda z: ExampleLevelConfig(n, b, k, z, req.delta, req.sampling)
    if req.unit != "client":
        raise ConfigError(f"--unit={req.unit!r} must be client or example")
    pop = _need(req.population, "population", "with --unit=client")
    if req.clients_per_round is not None and req.sampling_probability is not None:
        raise ConfigError("give either --clients_per_round or --sampling_probability, not both")
    if req.sampling_probability is not None:
        q = req.sampling_probability
        if not 0 < q <= 1:
            raise ConfigError(f"--sampling_probability={q} must be in (0, 1]")
        if req.sampling != "poisson":
            raise ConfigError("--sampling_probability goes with --sampling=poisson; with --sampling=fixed give "
                              "--clients_per_round")
        cpr = q * pop
    else:
        cpr = _need(req.clients_per_round, "clients_per_round", "(or --sampling_probability) with --unit=client")
    sb = math.inf if searching else req.clipped_count_stddev
    return lambda z: PrivacyConfig(pop, cpr, z, req.delta, req.sampling, sb)


def plan(req: PlanRequest) -> dict[str, Any]:
    """The report a run with these settings would get, plus what was solved for.

    * noise and rounds given: forward, ε.
    * target ε and rounds: the calibrated noise multiplier.
    * target ε and noise: the number of rounds affordable.
    """
    req = _normalise(req)
    make = _config_factory(req)
    if not 0 < req.delta < 1:
        raise ConfigError(f"--delta={req.delta} must be in (0, 1)")
    solved: dict[str, Any] = {}
    z, rounds = req.noise_multiplier, req.rounds
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds={rounds} must be at least 1")
    if req.target_epsilon is not None:
        if z is not None and rounds is not None:
            raise ConfigError("with --target_epsilon give --rounds (to solve for the noise multiplier) or "
                              "--noise_multiplier (to solve for rounds), not both")
        if rounds is not None:
            z = privacy.calibrate(_config_factory(req, searching=True), rounds, req.target_epsilon, req.delta)
            if req.unit == "client" and req.mechanism != "dp_ftrl":
                privacy.check_calibrated(z, make(1.0).clients_per_round, req.clipped_count_stddev,
                                         req.target_epsilon, rounds, make(1.0).population)
            solved = {"solved_for": "noise_multiplier", "noise_multiplier": z}
        elif z is not None:
            rounds = privacy.affordable_rounds(make(z), req.target_epsilon)
            solved = {"solved_for": "rounds", "rounds": rounds}
            if rounds == 0:
                raise ConfigError(f"--noise_multiplier={z} spends more than --target_epsilon={req.target_epsilon} "
                                  f"in a single round; raise --noise_multiplier or --target_epsilon")
        else:
            raise ConfigError("--target_epsilon needs --rounds (solve for the noise multiplier) or "
                              "--noise_multiplier (solve for the rounds affordable)")
    else:
        _need(z, "noise_multiplier", "(or --target_epsilon with --rounds)")
        _need(rounds, "rounds", "(or --target_epsilon with --noise_multiplier)")
    cfg = make(z)
    unit = "all of one user's data" if req.unit == "client" else "one record in one client's data"
    rep = report.build(cfg, rounds_run=rounds, rounds_planned=rounds, unit=unit, stop_reason="planned",
                       kind="plan",
                       noise_calibration=({"target_epsilon": req.target_epsilon, "rounds": rounds,
                                           "calibrated_noise_multiplier": z}
                                          if solved.get("solved_for") == "noise_multiplier" else None))
    if cfg.is_private:
        grid = sorted({max(1, round(rounds * i / 40)) for i in range(1, 41)})
        rep["epsilon_curve"] = [[r, privacy.epsilon(cfg, r)[0]] for r in grid]
    if solved:
        rep["solved"] = solved
        rep["plan"] = {"Solved for": solved["solved_for"],
                       "Target ε": f"{req.target_epsilon:g}",
                       "Answer": (f"noise multiplier {z:.4f}" if solved["solved_for"] == "noise_multiplier"
                                  else f"{rounds} rounds")}
    return rep


def rederive(run_dir: str) -> dict[str, Any]:
    """Re-derives ε of a run from the DpEvent recorded in its report, with
    dp_accounting alone, and compares it with the ε the report states."""
    path = os.path.join(run_dir, "privacy_report.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--run_dir={run_dir} has no privacy_report.json; point it at a training run's "
                          f"--output_dir")
    try:
        with open(path) as f:
            rep = json.load(f)
        event = privacy.event_from_json(rep["recorded_event"])
        delta = float(rep["delta"])
        scheme = rep["sampling"]["scheme"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--run_dir={run_dir}: privacy_report.json is not a report of this tool ({e})")
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    rel = (dp_accounting.NeighboringRelation[rep["accountant_relation"]] if "accountant_relation" in rep else
           dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if scheme == "poisson"
           else dp_accounting.NeighboringRelation.REPLACE_ONE)
    eps, order = rdp.RdpAccountant(neighboring_relation=rel).compose(event).get_epsilon_and_optimal_order(delta)
    eps_pld = None
    if scheme == "poisson" and rep.get("differentially_private"):
        eps_pld = float(pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta))
    stated = rep.get("epsilon")
    agree = (stated is None and not math.isfinite(eps)) or (
        stated is not None and math.isclose(stated, eps, rel_tol=1e-9))
    under_counted = None
    if scheme == "fixed" and rep.get("differentially_private") and rep.get("mechanism_name", "dp_fedavg") == "dp_fedavg":
        # DP-FedAvg reports written before the replace-one fix recorded z instead of z/2 (sensitivity 2C): recompute.
        want = float(rep["noise_multiplier"]) / 2
        if not math.isclose(_gaussian_multiplier(event), want, rel_tol=1e-9):
            fixed = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
                rep["sampling"]["population"], rep["sampling"]["clients_per_round"],
                dp_accounting.GaussianDpEvent(want)), int(rep["rounds_accounted"]))
            under_counted = rdp.RdpAccountant(neighboring_relation=rel).compose(fixed).get_epsilon(delta)
            agree = False
    rep["rederived"] = {"epsilon_rdp": eps if math.isfinite(eps) else None, "rdp_order": order,
                        "epsilon_pld": eps_pld, "matches_report": agree,
                        "epsilon_replace_one_corrected": under_counted}
    rep["plan"] = {"Re-derived ε (RDP, from recorded_event)": _f(eps),
                   "Re-derived ε (PLD, from recorded_event)": _f(eps_pld),
                   "Matches the stated ε": "yes" if agree else "**NO**"}
    return rep


def _gaussian_multiplier(event) -> float:
    """The Gaussian noise multiplier inside a recorded (composed, sampled) event."""
    while not hasattr(event, "noise_multiplier"):
        event = event.event
    return float(event.noise_multiplier)


def _f(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def render_text(rep: dict[str, Any]) -> str:
    lines = [rep["statement"], ""]
    if rep.get("solved"):
        s = rep["solved"]
        lines.append(f"solved for {s['solved_for']}: " + (f"noise multiplier {s['noise_multiplier']:.4f}"
                                                           if s["solved_for"] == "noise_multiplier"
                                                           else f"{s['rounds']} rounds"))
    if rep.get("rederived"):
        d = rep["rederived"]
        lines.append(f"re-derived from the recorded DpEvent: ε = {_f(d['epsilon_rdp'])} (RDP), "
                     f"{_f(d['epsilon_pld'])} (PLD); stated ε = {_f(rep.get('epsilon'))}: "
                     + ("match" if d["matches_report"] else "MISMATCH"))
        if d.get("epsilon_replace_one_corrected") is not None:
            lines.append(f"this report under-counts ε: its fixed-size (replace-one) event carries z, not z/2 (a "
                         f"client moves the clipped sum by 2C); corrected ε = {_f(d['epsilon_replace_one_corrected'])}")
    lines.append(f"unit: {rep['unit_of_privacy']}; neighbouring: {rep['neighbouring_relation']}; "
                 f"q = {rep['sampling']['q']:.6g} ({rep['sampling']['scheme']})")
    lines.append(f"ε (RDP) = {_f(rep['epsilon'])} at δ = {rep['delta']:g}, order {rep['rdp_order']}; "
                 f"ε (PLD) = {_f(rep['epsilon_pld'])}; zCDP ρ = "
                 + ("n/a" if rep.get("zcdp_rho") is None else f"{rep['zcdp_rho']:.4g}"))
    if rep["epsilon_at_other_delta"]:
        lines.append("ε at other δ: " + ", ".join(
            f"δ={d}: {_f(e['rdp'])} (RDP) / {_f(e['pld'])} (PLD)" if isinstance(e, dict) else f"δ={d}: {_f(e)} (RDP)"
            for d, e in rep["epsilon_at_other_delta"].items()))
    return "\n".join(lines)


__all__ = ["PlanRequest", "plan", "rederive", "render_text", "PrivacyConfigError"]


def plot_curve(rep: dict[str, Any], directory: str) -> Optional[str]:
    """privacy_report.png of a plan: ε (RDP) over rounds."""
    if not rep.get("epsilon_curve"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = zip(*rep["epsilon_curve"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, y, color="tab:red")
    ax.set_xlabel("round")
    ax.set_ylabel(f"ε (RDP) at δ = {rep['delta']:g}")
    ax.set_title(f"planned ε over rounds ({rep['unit_of_privacy']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, "privacy_report.png")
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path
