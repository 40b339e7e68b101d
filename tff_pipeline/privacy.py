"""Privacy configuration, client sampler and RDP accounting as pure functions.

Everything the accountant is told comes from one :class:`PrivacyConfig`: the
client sampler the training loop uses (:meth:`PrivacyConfig.sampler`) and the
``DpEvent`` the accountant composes (:func:`round_event`) are built from the
same fields, so they cannot disagree.

This module never imports TensorFlow Federated: privacy planning stays fast.

References:
  * DP-FedAvg, user-level DP: McMahan et al. 2018, "Learning Differentially
    Private Recurrent Language Models", https://arxiv.org/abs/1710.06963.
  * Adaptive clipping: Andrew et al. 2021, "Differentially Private Learning
    with Adaptive Clipping", https://arxiv.org/abs/1905.03871.
  * RDP of the sampled Gaussian mechanism: Mironov 2017
    (https://arxiv.org/abs/1702.07476), Mironov, Talwar, Zhang 2019
    (https://arxiv.org/abs/1908.10530); sampling without replacement:
    Wang, Balle, Kasiviswanathan 2019 (https://arxiv.org/abs/1808.00087).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any, Optional

import numpy as np

import dp_accounting
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant as rdp

SAMPLING_SCHEMES = ("poisson", "fixed")


class PrivacyConfigError(ValueError):
    """A privacy setting is invalid; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Everything that determines the privacy guarantee of a DP-FedAvg run.

    Attributes:
      population: number of clients that can be sampled (the training clients).
      clients_per_round: expected (Poisson) or exact (fixed) cohort size.
      noise_multiplier: z, the total noise multiplier of the Gaussian
        mechanism relative to the clip norm, including the share spent on the
        private quantile estimate of adaptive clipping (Andrew et al. 2021,
        Sec. 3.1; TFF's ``gaussian_adaptive``). 0 means no DP.
      delta: the δ of the reported (ε, δ).
      sampling: "poisson" (each client joins each round independently with
        q = clients_per_round / population; neighbouring = add/remove one
        client) or "fixed" (exactly clients_per_round clients drawn without
        replacement; neighbouring = replace one client).
      clipped_count_stddev: σ_b of the noise on the clipped-client count in
        adaptive clipping (Andrew et al. 2021, Alg. 1). None uses TFF's default
        0.05 × clients_per_round.
    """

    population: int
    clients_per_round: int
    noise_multiplier: float
    delta: float
    sampling: str = "poisson"
    clipped_count_stddev: Optional[float] = None

    def __post_init__(self):
        validate(self)

    @property
    def sampling_probability(self) -> float:
        return self.clients_per_round / self.population

    @property
    def is_private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def effective_clipped_count_stddev(self) -> float:
        if not self.is_private:
            return 0.0
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return 0.05 * self.clients_per_round

    @property
    def neighboring_relation(self) -> str:
        return "add or remove one client" if self.sampling == "poisson" else "replace one client"

    @property
    def event_noise_multiplier(self) -> float:
        """z relative to the l2-sensitivity of the round's release, as dp_accounting wants it.

        Under add/remove-one (Poisson) one client moves the clipped sum by C and its centred clipped-count bit
        by 1/2: the multiplier is z. Under replace-one (fixed size) the sum moves by 2C and the bit by 1, so both
        parts of the noise are worth half as much: z/2 (Andrew et al. 2021, Thm 1 splits z the same way)."""
        return self.noise_multiplier if self.sampling == "poisson" else self.noise_multiplier / 2

    def sampler(self, public_seed: Optional[int] = None) -> "ClientSampler":
        return ClientSampler(self, public_seed)


@dataclasses.dataclass(frozen=True)
class ExampleLevelConfig:
    """Example-level DP: DP-SGD inside each client (Abadi et al. 2016,
    https://arxiv.org/abs/1607.00133), for cross-silo settings where the unit
    to protect is one record (e.g. a hospital visit), not a whole client.

    Each round, a client takes ``local_steps`` DP-SGD steps; each step
    Poisson-samples its batch with q = batch_size / examples_per_client, clips
    every example's gradient and adds Gaussian noise of ``noise_multiplier``
    × clip. A record is in one client, so its privacy is that client's
    composition over all local steps of all rounds (counted as if the client
    took part in every round: no amplification by client sampling is claimed).
    """

    examples_per_client: int
    batch_size: int
    local_steps: int
    noise_multiplier: float
    delta: float
    sampling: str = "poisson"

    def __post_init__(self):
        for name in ("examples_per_client", "batch_size", "local_steps"):
            v = getattr(self, name)
            if v < 1:
                raise PrivacyConfigError(f"--{name}={v} must be at least 1")
        if self.batch_size > self.examples_per_client:
            raise PrivacyConfigError(f"--batch_size={self.batch_size} exceeds --examples_per_client="
                                     f"{self.examples_per_client}; use at most {self.examples_per_client}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyConfigError(
                f"--noise_multiplier={self.noise_multiplier} must be a finite number >= 0 (0 means no DP)")
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"--delta={self.delta} must be in (0, 1); use e.g. 1/examples or smaller")
        if self.sampling != "poisson":
            raise PrivacyConfigError("--sampling: example-level DP-SGD is accounted with Poisson-sampled batches; "
                                     "use --sampling=poisson")

    @property
    def sampling_probability(self) -> float:
        return self.batch_size / self.examples_per_client

    @property
    def is_private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def neighboring_relation(self) -> str:
        return "add or remove one example (one record) in one client's data"

    @property
    def event_noise_multiplier(self) -> float:
        return self.noise_multiplier  # add/remove one example: the clipped sum moves by the clip norm


def validate(cfg: PrivacyConfig) -> None:
    """Raises PrivacyConfigError naming the flag, its value and the fix."""
    if cfg.population < 1:
        raise PrivacyConfigError(f"population={cfg.population}: the task has no training clients")
    if cfg.clients_per_round < 1:
        raise PrivacyConfigError(f"--clients_per_round={cfg.clients_per_round} must be at least 1")
    if cfg.clients_per_round > cfg.population:
        raise PrivacyConfigError(
            f"--clients_per_round={cfg.clients_per_round} exceeds the population of "
            f"{cfg.population} training clients; use at most {cfg.population}"
        )
    if not (cfg.noise_multiplier >= 0 and math.isfinite(cfg.noise_multiplier)):
        raise PrivacyConfigError(
            f"--noise_multiplier={cfg.noise_multiplier} must be a finite number >= 0 (0 means no DP)"
        )
    if not (0 < cfg.delta < 1):
        raise PrivacyConfigError(f"--delta={cfg.delta} must be in (0, 1); use e.g. 1/population or smaller")
    if cfg.sampling not in SAMPLING_SCHEMES:
        raise PrivacyConfigError(f"--sampling={cfg.sampling!r} must be one of {', '.join(SAMPLING_SCHEMES)}")
    if cfg.clipped_count_stddev is not None and cfg.clipped_count_stddev < 0:
        raise PrivacyConfigError(f"--clipped_count_stddev={cfg.clipped_count_stddev} must be >= 0")
    check_adaptive_clipping(cfg.noise_multiplier, cfg.clients_per_round, cfg.clipped_count_stddev, cfg.population)


def check_adaptive_clipping(noise_multiplier: float, clients_per_round: int, clipped_count_stddev: Optional[float],
                            population: Optional[int] = None) -> None:
    """Adaptive clipping splits z between the update and the clipped count.

    The update gets z_u = (z^-2 - (2 σ_b)^-2)^-1/2 (Andrew et al. 2021, Thm 1),
    which exists only if z < 2 σ_b.
    """
    if noise_multiplier <= 0:
        return
    sb = 0.05 * clients_per_round if clipped_count_stddev is None else clipped_count_stddev
    if noise_multiplier >= 2 * sb:
        need = noise_multiplier / 2 * 1.25
        clients = math.floor(noise_multiplier / 0.1) + 1  # the default σ_b = 0.05 x clients_per_round
        more = (f"raise --clients_per_round to at least {clients}, " if clipped_count_stddev is None
                and (population is None or clients <= population) else "")
        raise PrivacyConfigError(
            f"--noise_multiplier={noise_multiplier} is too large for adaptive clipping with "
            f"clipped_count_stddev={sb:g} (must be < 2 x clipped_count_stddev); set "
            f"--clipped_count_stddev to e.g. {need:.3g}, {more}or lower --noise_multiplier"
        )


def update_noise_multiplier(cfg: PrivacyConfig) -> float:
    """The noise multiplier actually applied to the clipped updates."""
    if not cfg.is_private:
        return 0.0
    sb = cfg.effective_clipped_count_stddev
    return (cfg.noise_multiplier**-2 - (2 * sb) ** -2) ** -0.5


class ClientSampler:
    """Draws each round's cohort exactly as the accountant assumes.

    By default every draw uses fresh secret randomness (``secrets``, the OS's
    entropy), which no output of the run contains: amplification by sampling
    needs the cohorts to be unknown to whoever sees the model. A resumed run,
    and a round run again after a crash, simply draws anew: each draw is
    independent, which is what the accountant composes.

    ``public_seed`` (research only, opt-in) makes the cohorts a function of
    (seed, round, attempt), reproducible and therefore NOT secret: against
    anyone who knows the seed, the amplified ε does not hold (the report then
    also gives ε without amplification, ``epsilon_known_sampling``).
    """

    def __init__(self, cfg: PrivacyConfig, public_seed: Optional[int] = None):
        self.cfg = cfg
        self.public_seed = public_seed

    @property
    def secret(self) -> bool:
        return self.public_seed is None

    def sample(self, round_num: int, attempt: int = 0) -> np.ndarray:
        """The cohort of ``round_num`` (``attempt`` > 0: the round run again after a crash)."""
        if self.public_seed is None:
            rng = np.random.default_rng(secrets.randbits(128))
        else:
            rng = np.random.default_rng([self.public_seed, round_num, 0x5A3] + ([attempt] if attempt else []))
        n = self.cfg.population
        if self.cfg.sampling == "poisson":
            return np.flatnonzero(rng.random(n) < self.cfg.sampling_probability)
        return np.sort(rng.choice(n, size=self.cfg.clients_per_round, replace=False))


def round_event(cfg) -> dpe.DpEvent:
    """The DpEvent of one round: a DP-FedAvg round with this config's client
    sampler, or a client's local DP-SGD steps (ExampleLevelConfig)."""
    if not cfg.is_private:
        return dpe.NonPrivateDpEvent()
    gaussian = dpe.GaussianDpEvent(cfg.event_noise_multiplier)
    if isinstance(cfg, ExampleLevelConfig):
        return dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(cfg.sampling_probability, gaussian),
                                       cfg.local_steps)
    if cfg.sampling == "poisson":
        return dpe.PoissonSampledDpEvent(cfg.sampling_probability, gaussian)
    return dpe.SampledWithoutReplacementDpEvent(cfg.population, cfg.clients_per_round, gaussian)


def training_event(cfg, rounds: int) -> dpe.DpEvent:
    return dpe.SelfComposedDpEvent(round_event(cfg), rounds)


def _rdp_accountant(sampling: str) -> rdp.RdpAccountant:
    rel = (
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        if sampling == "poisson"
        else dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    return rdp.RdpAccountant(neighboring_relation=rel)


def epsilon(cfg, rounds: int) -> tuple[float, Optional[float]]:
    """(ε, best RDP order) after ``rounds`` rounds; (inf, None) without DP."""
    if not cfg.is_private:
        return math.inf, None
    if rounds == 0:
        return 0.0, None
    acc = _rdp_accountant(cfg.sampling).compose(training_event(cfg, rounds))
    eps, order = acc.get_epsilon_and_optimal_order(cfg.delta)
    return float(eps), float(order)


def calibrate_noise_multiplier(
    target_epsilon: float,
    rounds: int,
    population: int,
    clients_per_round: int,
    delta: float,
    sampling: str = "poisson",
    clipped_count_stddev: Optional[float] = None,
) -> float:
    """Smallest z whose RDP ε after ``rounds`` rounds is <= target_epsilon."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"--target_epsilon={target_epsilon} must be a finite number > 0")
    if rounds < 1:
        raise PrivacyConfigError(f"--rounds={rounds} must be at least 1")

    # The DpEvent does not depend on σ_b: search without the adaptive-clipping bound, check the answer.
    z = calibrate(lambda z: PrivacyConfig(population, clients_per_round, z, delta, sampling, math.inf),
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


def zcdp_rho(cfg, rounds: int) -> Optional[float]:
    """ρ of zero-concentrated DP (Bun & Steinke 2016) where it applies: the
    Gaussian mechanism without subsampling (q = 1), ρ = rounds·steps/(2 σ²)
    with σ the multiplier relative to the sensitivity (z/2 under replace-one).
    None for subsampled mechanisms, whose amplification zCDP does not capture."""
    if not cfg.is_private or cfg.sampling_probability < 1:
        return None
    steps = cfg.local_steps if isinstance(cfg, ExampleLevelConfig) else 1
    return rounds * steps / (2 * cfg.event_noise_multiplier**2)


def known_sampling_epsilon(cfg, max_participations: int) -> Optional[float]:
    """ε of the client that took part most often, when the cohorts are known
    (public sampling seed): its rounds compose as plain Gaussian mechanisms,
    with no amplification by sampling. None without DP."""
    if not cfg.is_private:
        return None
    if max_participations == 0:
        return 0.0
    acc = _rdp_accountant(cfg.sampling).compose(
        dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(cfg.event_noise_multiplier), max_participations))
    return float(acc.get_epsilon(cfg.delta))


def calibrate(make_cfg, rounds: int, target_epsilon: float, delta: float) -> float:
    """Smallest noise multiplier z on a 1e-4 grid with RDP ε(make_cfg(z), rounds) <= target."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"--target_epsilon={target_epsilon} must be a finite number > 0")
    if rounds < 1:
        raise PrivacyConfigError(f"--rounds={rounds} must be at least 1")
    sampling = make_cfg(1.0).sampling
    z = float(dp_accounting.calibrate_dp_mechanism(
        lambda: _rdp_accountant(sampling), lambda z: training_event(make_cfg(z), rounds), target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.01, 1.0), tol=1e-4))
    # Rounded up to 4 decimals (never to the nearest), so the z that is printed, stored and used is one value
    # and its ε never exceeds the target.
    z = round_up(z)
    while epsilon(make_cfg(z), rounds)[0] > target_epsilon:
        z = round_up(z + Z_STEP)
    while z > Z_STEP and epsilon(make_cfg(round(z - Z_STEP, 4)), rounds)[0] <= target_epsilon:
        z = round(z - Z_STEP, 4)  # the search's tolerance: the smallest z on the 1e-4 grid
    return z


Z_STEP = 1e-4


def round_up(z: float) -> float:
    """z rounded up to a multiple of 1e-4 (a noise multiplier may only grow when rounded)."""
    return round(math.ceil(round(z / Z_STEP, 6)) * Z_STEP, 4)


def affordable_rounds(cfg, target_epsilon: float, limit: int = 10_000_000) -> int:
    """The most rounds whose RDP ε stays <= target_epsilon (0 if not even one)."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"--target_epsilon={target_epsilon} must be a finite number > 0")
    if not cfg.is_private:
        raise PrivacyConfigError("--noise_multiplier=0 gives no DP, so no number of rounds fits a finite ε; "
                                 "set --noise_multiplier > 0")
    if epsilon(cfg, 1)[0] > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi <= limit and epsilon(cfg, hi)[0] <= target_epsilon:
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit
    while hi - lo > 1:  # ε(lo) <= target < ε(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if epsilon(cfg, mid)[0] <= target_epsilon else (lo, mid)
    return lo


# --- DpEvent (de)serialisation, so anyone can recompute ε from a report. ---

_EVENT_TYPES = {
    c.__name__: c
    for c in (
        dpe.NoOpDpEvent,
        dpe.NonPrivateDpEvent,
        dpe.GaussianDpEvent,
        dpe.SelfComposedDpEvent,
        dpe.ComposedDpEvent,
        dpe.PoissonSampledDpEvent,
        dpe.SampledWithoutReplacementDpEvent,
        dpe.SampledWithReplacementDpEvent,
    )
}


def event_to_json(event: dpe.DpEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in dataclasses.fields(event) if dataclasses.is_dataclass(event) else event.__attrs_attrs__:
        v = getattr(event, f.name)
        if isinstance(v, dpe.DpEvent):
            v = event_to_json(v)
        elif isinstance(v, (list, tuple)):
            v = [event_to_json(e) for e in v]
        out[f.name] = v
    return out


def event_from_json(obj: dict[str, Any]) -> dpe.DpEvent:
    obj = dict(obj)
    cls = _EVENT_TYPES[obj.pop("type")]
    kwargs = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            v = event_from_json(v)
        elif isinstance(v, list):
            v = [event_from_json(e) for e in v]
        kwargs[k] = v
    return cls(**kwargs)
