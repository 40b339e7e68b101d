"""Privacy accounting as pure functions of a mechanism (tff_pipeline.mechanisms).

Kept for scripts and tests that speak of "a privacy config": every function
here asks the mechanism object, which owns its relation, sampler, events and
calibration. Never imports TensorFlow.
"""

from __future__ import annotations

import math
from typing import Optional

from dp_accounting import dp_event as dpe

from tff_pipeline.mechanisms import base
from tff_pipeline.mechanisms.base import (PrivacyConfigError, Z_STEP, affordable_rounds, calibrate,  # noqa: F401
                                          event_from_json, event_to_json, round_up)
from tff_pipeline.mechanisms.dp_fedavg import (SAMPLING_SCHEMES, ClientSampler,  # noqa: F401
                                               DPFedAvgAdaptive as PrivacyConfig, check_adaptive_clipping)
from tff_pipeline.mechanisms.dp_sgd import DPSGDInClient as ExampleLevelConfig  # noqa: F401
from tff_pipeline.mechanisms import check_calibrated  # noqa: F401


def round_event(mech: base.Mechanism) -> dpe.DpEvent:
    return mech.round_event()


def training_event(mech: base.Mechanism, rounds: int) -> dpe.DpEvent:
    return mech.training_event(rounds)


def epsilon(mech: base.Mechanism, rounds: int) -> tuple[float, Optional[float]]:
    """(ε, best RDP order) after ``rounds`` rounds; (inf, None) without DP."""
    return mech.epsilon(rounds)


def zcdp_rho(mech: base.Mechanism, rounds: int) -> Optional[float]:
    return mech.zcdp_rho(rounds)


def update_noise_multiplier(mech: PrivacyConfig) -> float:
    return mech.update_noise_multiplier


def known_sampling_epsilon(mech: PrivacyConfig, max_participations: int) -> Optional[float]:
    return mech.known_sampling_epsilon(max_participations)


def calibrate_noise_multiplier(target_epsilon: float, rounds: int, population: int, clients_per_round: int,
                               delta: float, sampling: str = "poisson",
                               clipped_count_stddev: Optional[float] = None) -> float:
    """Smallest z whose RDP ε of DP-FedAvg after ``rounds`` rounds is <= target_epsilon."""
    base.check_target(target_epsilon, rounds)
    # The DpEvent does not depend on σ_b: search without the adaptive-clipping bound, check the answer.
    z = calibrate(lambda z: PrivacyConfig(population, clients_per_round, z, delta, sampling, math.inf),
                  rounds, target_epsilon, delta)
    check_calibrated(z, clients_per_round, clipped_count_stddev, target_epsilon, rounds, population)
    return z
