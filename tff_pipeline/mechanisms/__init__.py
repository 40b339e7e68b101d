"""The DP mechanisms: one module each, registered here.

Adding a mechanism: write ``mechanisms/<name>.py`` (a frozen dataclass
subclassing ``base.Mechanism``, with a ``resolve`` classmethod that turns the
run's privacy settings and the task into its fields) and add it to
``REGISTRY`` (and its name to ``config.MECHANISMS``, which a test checks).
The loop, ledger, report, planner and budget guard only call the
mechanism's methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tff_pipeline.mechanisms.base import (Mechanism, PrivacyConfigError, Resolved, RoundPlan, affordable_rounds,
                                          calibrate, event_from_json, event_to_json)
from tff_pipeline.mechanisms.dp_fedavg import (DPFedAvgAdaptive, calibrate_dp_fedavg, check_adaptive_clipping,
                                               check_calibrated)
from tff_pipeline.mechanisms.dp_ftrl import DPFTRL
from tff_pipeline.mechanisms.distributed_dp import DistributedDDG
from tff_pipeline.mechanisms.dp_sgd import DPSGDInClient, DPSGDServerNoise

REGISTRY = {m.name: m for m in (DPFedAvgAdaptive, DPSGDInClient, DPFTRL, DPSGDServerNoise, DistributedDDG)}
NAMES = tuple(REGISTRY)


def name_for(cfg, task) -> str:
    """--mechanism, or with --mechanism=auto the one the task's privacy unit implies."""
    p = cfg.privacy
    if p.mechanism != "auto":
        unit = REGISTRY[p.mechanism].unit
        if p.privacy_unit not in ("auto", unit):
            raise PrivacyConfigError(f"--mechanism={p.mechanism} protects one {unit}, but --privacy_unit="
                                     f"{p.privacy_unit}; drop --privacy_unit or choose a matching --mechanism")
        return p.mechanism
    unit = task.default_privacy_unit if p.privacy_unit == "auto" else p.privacy_unit
    return "dp_sgd" if unit == "example" else "dp_fedavg"


def resolve(cfg, task) -> Resolved:
    """The run's mechanism, from its privacy settings and the task (z calibrated from --target_epsilon)."""
    name = name_for(cfg, task)
    if cfg.privacy.secure_aggregation and name != "dp_fedavg":
        raise PrivacyConfigError(f"--secure_aggregation needs client-level DP-FedAvg (--privacy_unit=client, "
                                 f"--mechanism=dp_fedavg); this run's mechanism is {name}")
    if cfg.privacy.aggregation != "mean" and name != "dp_fedavg":
        raise PrivacyConfigError(f"--aggregation={cfg.privacy.aggregation} runs in the cohort round of "
                                 f"--mechanism=dp_fedavg (without DP: --noise_multiplier=0); this run's mechanism is "
                                 f"{name}")
    if cfg.meta_learning != "none" and name not in ("dp_fedavg", "dp_ftrl"):
        raise PrivacyConfigError(f"--meta_learning={cfg.meta_learning} changes the clients' work in the cohort "
                                 f"round of dp_fedavg and dp_ftrl (client level); this run's mechanism is {name}")
    return REGISTRY[name].resolve(cfg, task)


def from_json(info: dict[str, Any]) -> Mechanism:
    """The mechanism a run's config.json records ("mechanism" name and "privacy" fields)."""
    cls = REGISTRY[info.get("mechanism", "dp_sgd" if info.get("privacy_unit") == "example" else "dp_fedavg")]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in info["privacy"].items() if k in fields})


__all__ = ["Mechanism", "RoundPlan", "REGISTRY", "NAMES", "Resolved", "resolve", "from_json", "calibrate",
           "affordable_rounds", "event_to_json", "event_from_json", "PrivacyConfigError", "DPFedAvgAdaptive",
           "DPSGDInClient", "DPSGDServerNoise", "DPFTRL", "DistributedDDG"]
