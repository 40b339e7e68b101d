"""Privacy accounting as pure functions of a mechanism (tff_pipeline.mechanisms).

Kept for scripts and tests that speak of "a privacy config": every function
here asks the mechanism object, which owns its relation, sampler, events and
calibration. Never imports TensorFlow.
"""

from __future__ import annotations

from typing import Optional

from dp_accounting import dp_event as dpe

from tff_pipeline.mechanisms import base
from tff_pipeline.mechanisms.base import (PrivacyConfigError, Z_STEP, affordable_rounds, calibrate,  # noqa: F401
                                          event_from_json, event_to_json, round_up)
from tff_pipeline.mechanisms.dp_fedavg import (SAMPLING_SCHEMES, ClientSampler,  # noqa: F401
                                               DPFedAvgAdaptive as PrivacyConfig, check_adaptive_clipping)
from tff_pipeline.mechanisms.dp_sgd import DPSGDInClient as ExampleLevelConfig  # noqa: F401
from tff_pipeline.mechanisms import check_calibrated  # noqa: F401
from tff_pipeline.mechanisms import calibrate_dp_fedavg as calibrate_noise_multiplier  # noqa: F401


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
