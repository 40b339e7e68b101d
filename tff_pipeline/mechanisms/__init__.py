"""The DP mechanisms: one module each, registered here.

Adding a mechanism: write ``mechanisms/<name>.py`` (a frozen dataclass
subclassing ``base.Mechanism``), add it to ``REGISTRY`` and give it a
``resolve_<name>`` below (how the run's flags and the task become its
fields). The loop, ledger, report, planner and budget guard only call the
mechanism's methods.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from tff_pipeline.mechanisms.base import (Mechanism, PrivacyConfigError, RoundPlan, affordable_rounds, calibrate,
                                          event_from_json, event_to_json)
from tff_pipeline.mechanisms.dp_fedavg import DPFedAvgAdaptive, check_adaptive_clipping
from tff_pipeline.mechanisms.dp_ftrl import DPFTRL
from tff_pipeline.mechanisms.dp_sgd import DPSGDInClient

REGISTRY = {m.name: m for m in (DPFedAvgAdaptive, DPSGDInClient, DPFTRL)}
NAMES = tuple(REGISTRY)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The run's mechanism, how z was chosen, and (example level) each client's own mechanism."""

    mechanism: Mechanism
    calibration: Optional[dict]
    per_client: Optional[dict] = None


def name_for(cfg, task) -> str:
    """--mechanism, or with --mechanism=auto the one the task's privacy unit implies."""
    if cfg.mechanism != "auto":
        unit = REGISTRY[cfg.mechanism].unit
        if cfg.privacy_unit not in ("auto", unit):
            raise PrivacyConfigError(f"--mechanism={cfg.mechanism} protects one {unit}, but --privacy_unit="
                                     f"{cfg.privacy_unit}; drop --privacy_unit or choose a matching --mechanism")
        return cfg.mechanism
    unit = task.default_privacy_unit if cfg.privacy_unit == "auto" else cfg.privacy_unit
    return "dp_sgd" if unit == "example" else "dp_fedavg"


def resolve(cfg, task) -> Resolved:
    name = name_for(cfg, task)
    return {"dp_fedavg": resolve_dp_fedavg, "dp_sgd": resolve_dp_sgd, "dp_ftrl": resolve_dp_ftrl}[name](cfg, task)


def _calibrated(make, cfg) -> tuple[float, Optional[dict]]:
    if cfg.target_epsilon is None:
        return cfg.noise_multiplier, None
    z = calibrate(make, cfg.rounds, cfg.target_epsilon, cfg.delta)
    return z, {"target_epsilon": cfg.target_epsilon, "rounds": cfg.rounds, "calibrated_noise_multiplier": z}


def resolve_dp_fedavg(cfg, task) -> Resolved:
    z, calib = cfg.noise_multiplier, None
    if cfg.target_epsilon is not None:
        z = calibrate_dp_fedavg(cfg.target_epsilon, cfg.rounds, task.population, cfg.clients_per_round, cfg.delta,
                                cfg.sampling, cfg.clipped_count_stddev)
        calib = {"target_epsilon": cfg.target_epsilon, "rounds": cfg.rounds, "calibrated_noise_multiplier": z}
    return Resolved(DPFedAvgAdaptive(task.population, cfg.clients_per_round, z, cfg.delta, cfg.sampling,
                                     cfg.clipped_count_stddev, cfg.initial_clip, cfg.target_unclipped_quantile,
                                     cfg.clip_learning_rate), calib)


def calibrate_dp_fedavg(target_epsilon: float, rounds: int, population: int, clients_per_round: int, delta: float,
                        sampling: str = "poisson", clipped_count_stddev: Optional[float] = None) -> float:
    """Smallest z whose RDP ε of DP-FedAvg after ``rounds`` rounds is <= target_epsilon. The DpEvent does not
    depend on σ_b: the search runs without the adaptive-clipping bound, and the answer is checked after."""
    z = calibrate(lambda z: DPFedAvgAdaptive(population, clients_per_round, z, delta, sampling, math.inf),
                  rounds, target_epsilon, delta)
    check_calibrated(z, clients_per_round, clipped_count_stddev, target_epsilon, rounds, population)
    return z


def check_calibrated(z: float, clients_per_round, clipped_count_stddev, target_epsilon: float, rounds: int,
                     population: Optional[int] = None) -> None:
    """check_adaptive_clipping for a calibrated z, with a message about the target."""
    try:
        check_adaptive_clipping(z, clients_per_round, clipped_count_stddev, population)
    except PrivacyConfigError as e:
        fix = str(e).split("; ", 1)[1].replace("or lower --noise_multiplier", "or raise --target_epsilon")
        raise PrivacyConfigError(
            f"--target_epsilon={target_epsilon:g} over --rounds={rounds} needs noise multiplier {z:.4f}, too large "
            f"for adaptive clipping (z must be < 2 x clipped_count_stddev); {fix}") from None


def resolve_dp_ftrl(cfg, task) -> Resolved:
    if cfg.sampling != "poisson":
        raise PrivacyConfigError(f"--sampling={cfg.sampling} does not apply to --mechanism=dp_ftrl, which samples "
                                 f"nobody (each epoch is a shuffled pass in cohorts); drop --sampling")

    def make(z):
        return DPFTRL(task.population, cfg.clients_per_round, z, cfg.delta, cfg.ftrl_clip)

    z, calib = _calibrated(make, cfg)
    return Resolved(make(z), calib)


def resolve_dp_sgd(cfg, task) -> Resolved:
    """The accounted client is the one with the fewest examples (largest q, hence largest ε: the guarantee
    every record gets); each client's own mechanism is in ``per_client``."""
    if not task.example_counts:
        raise PrivacyConfigError(f"--privacy_unit=example: task {task.name!r} does not support example-level DP; "
                                 f"use --privacy_unit=client")
    n_min = min(task.example_counts)

    def make(z, n=n_min):
        return DPSGDInClient(n, cfg.batch_size, cfg.local_steps, z, cfg.delta, "poisson", cfg.l2_norm_clip,
                             task.population)

    z, calib = _calibrated(make, cfg)
    per_client = {name: {"examples": n, "q": cfg.batch_size / n, "mechanism": make(z, n)}
                  for name, n in zip(task.client_names, task.example_counts)}
    return Resolved(make(z), calib, per_client)


def from_json(info: dict[str, Any]) -> Mechanism:
    """The mechanism a run's config.json records ("mechanism" name and "privacy" fields)."""
    cls = REGISTRY[info.get("mechanism", "dp_sgd" if info.get("privacy_unit") == "example" else "dp_fedavg")]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in info["privacy"].items() if k in fields})


__all__ = ["Mechanism", "RoundPlan", "REGISTRY", "NAMES", "Resolved", "resolve", "from_json", "calibrate",
           "affordable_rounds", "event_to_json", "event_from_json", "PrivacyConfigError", "DPFedAvgAdaptive",
           "DPSGDInClient", "DPFTRL"]
