"""DP-FedAvg with adaptive clipping: client-level DP with a sampled cohort.

* DP-FedAvg, user-level DP: McMahan et al. 2018, https://arxiv.org/abs/1710.06963.
* Adaptive clipping: Andrew et al. 2021, https://arxiv.org/abs/1905.03871
  (TFF's ``DifferentiallyPrivateFactory.gaussian_adaptive``).
* RDP of the sampled Gaussian: Mironov et al. 2019, https://arxiv.org/abs/1908.10530;
  without replacement: Wang, Balle, Kasiviswanathan 2019, https://arxiv.org/abs/1808.00087.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any, ClassVar, Optional

import numpy as np

import dp_accounting
from dp_accounting import dp_event as dpe

from tff_pipeline.mechanisms.base import (Mechanism, PrivacyConfigError, Resolved, RoundPlan, calibrate, calibration,
                                         composed)

SAMPLING_SCHEMES = ("poisson", "fixed")


@dataclasses.dataclass(frozen=True)
class DPFedAvgAdaptive(Mechanism):
    """DP-FedAvg with adaptive clipping (one frozen object: relation, sampler, events, process).

    Attributes:
      population: number of clients that can be sampled (treated as public).
      clients_per_round: expected (Poisson) or exact (fixed) cohort size.
      noise_multiplier: z, the total noise multiplier including the share
        spent on the private clip quantile (Andrew et al. 2021, Thm 1).
        0 means no DP.
      delta: the δ of the reported (ε, δ).
      sampling: "poisson" (add/remove one client, q = clients_per_round /
        population) or "fixed" (replace one client; without replacement).
      clipped_count_stddev: σ_b on the clipped count (Andrew et al. 2021,
        Alg. 1); None = TFF's default 0.05 × clients_per_round.
      initial_clip, target_unclipped_quantile, clip_learning_rate: C_0, γ and
        η_C of the geometric clip update (Andrew et al. 2021, Alg. 1).
    """

    population: int
    clients_per_round: int
    noise_multiplier: float
    delta: float
    sampling: str = "poisson"
    clipped_count_stddev: Optional[float] = None
    initial_clip: float = 0.1
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    secure_aggregation: bool = False
    secure_sum_bound: float = 100.0
    aggregation: str = "mean"
    attention_temperature: float = 1.0

    name: ClassVar[str] = "dp_fedavg"
    title: ClassVar[str] = "DP-FedAvg with adaptive clipping (Andrew et al. 2021), TFF gaussian_adaptive aggregator"
    unit: ClassVar[str] = "client"

    def __post_init__(self):
        check_cohort(self.population, self.clients_per_round)
        check_noise_delta(self.noise_multiplier, self.delta)
        if self.sampling not in SAMPLING_SCHEMES:
            raise PrivacyConfigError(f"--sampling={self.sampling!r} must be one of {', '.join(SAMPLING_SCHEMES)}")
        if self.clipped_count_stddev is not None and self.clipped_count_stddev < 0:
            raise PrivacyConfigError(f"--clipped_count_stddev={self.clipped_count_stddev} must be >= 0")
        check_adaptive_clipping(self.noise_multiplier, self.clients_per_round, self.clipped_count_stddev,
                                self.population)
        if self.aggregation not in ("mean", "attentive"):
            raise PrivacyConfigError(f"--aggregation={self.aggregation!r} must be mean or attentive")
        if self.aggregation == "attentive" and self.is_private:
            raise PrivacyConfigError(
                f"--aggregation=attentive (FedAtt) weighs each client by its own and every other client's update, "
                f"so one client changes all the weights and the clip norm no longer bounds its effect: client-level "
                f"DP (here noise multiplier {self.noise_multiplier:.4g}) cannot be claimed for it; run FedAtt "
                f"without DP (--noise_multiplier=0) or keep DP with --aggregation=mean")
        if self.aggregation == "attentive" and self.secure_aggregation:
            raise PrivacyConfigError("--aggregation=attentive needs each client's update norms on the server, which "
                                     "--secure_aggregation hides; drop one of the two")
        if self.secure_aggregation and self.initial_clip > self.secure_sum_bound:
            raise PrivacyConfigError(
                f"--secure_sum_bound={self.secure_sum_bound:g} is below --initial_clip={self.initial_clip:g}: the "
                f"secure sum would clip the clipped updates again; raise --secure_sum_bound above the clip norm")

    # --- relation and events ---
    @property
    def relation(self):
        return (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
                else dp_accounting.NeighboringRelation.REPLACE_ONE)

    @property
    def relation_text(self) -> str:
        return "add or remove one client" if self.sampling == "poisson" else "replace one client"

    @property
    def sampling_probability(self) -> float:
        return self.clients_per_round / self.population

    @property
    def event_noise_multiplier(self) -> float:
        """Under add/remove-one a client moves the clipped sum by C and its centred clipped-count bit by 1/2:
        z. Under replace-one the sum moves by 2C and the bit by 1, so both noise parts are worth half: z/2."""
        return self.noise_multiplier if self.sampling == "poisson" else self.noise_multiplier / 2

    @property
    def effective_clipped_count_stddev(self) -> float:
        if not self.is_private:
            return 0.0
        return 0.05 * self.clients_per_round if self.clipped_count_stddev is None else self.clipped_count_stddev

    @property
    def update_noise_multiplier(self) -> float:
        """The share of z applied to the clipped updates: (z^-2 - (2 σ_b)^-2)^-1/2 (Andrew et al. 2021, Thm 1)."""
        if not self.is_private:
            return 0.0
        return (self.noise_multiplier**-2 - (2 * self.effective_clipped_count_stddev) ** -2) ** -0.5

    def round_event(self) -> dpe.DpEvent:
        if not self.is_private:
            return dpe.NonPrivateDpEvent()
        gaussian = dpe.GaussianDpEvent(self.event_noise_multiplier)
        if self.sampling == "poisson":
            return dpe.PoissonSampledDpEvent(self.sampling_probability, gaussian)
        return dpe.SampledWithoutReplacementDpEvent(self.population, self.clients_per_round, gaussian)

    def pld_epsilon(self, event, delta: float) -> Optional[float]:
        if not self.is_private or self.sampling != "poisson" or isinstance(event, dpe.NoOpDpEvent):
            return None
        from dp_accounting.pld import pld_privacy_accountant

        return float(composed("pld", pld_privacy_accountant.PLDAccountant, event).get_epsilon(delta))

    def zcdp_rho(self, rounds: int, entries=None) -> Optional[float]:
        """ρ = rounds/(2 σ²) of the un-subsampled Gaussian (q = 1; Bun & Steinke 2016); None when subsampled."""
        if not self.is_private or self.sampling_probability < 1:
            return None
        return rounds / (2 * self.event_noise_multiplier**2)

    def known_sampling_epsilon(self, max_participations: int) -> Optional[float]:
        """ε of the most frequent participant when the cohorts are known (public seed): plain Gaussians."""
        if not self.is_private:
            return None
        if max_participations == 0:
            return 0.0
        return self.epsilon_of(dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(self.event_noise_multiplier),
                                                       max_participations))[0]

    @classmethod
    def resolve(cls, cfg, task) -> Resolved:
        p = cfg.privacy
        z, calib = p.noise_multiplier, None
        if p.target_epsilon is not None:
            z = calibrate_dp_fedavg(p.target_epsilon, cfg.rounds, task.population, p.clients_per_round, p.delta,
                                    p.sampling, p.clipped_count_stddev)
            calib = calibration(cfg, z)
        return Resolved(cls(task.population, p.clients_per_round, z, p.delta, p.sampling, p.clipped_count_stddev,
                            p.initial_clip, p.target_unclipped_quantile, p.clip_learning_rate,
                            p.secure_aggregation, p.secure_sum_bound, p.aggregation, p.attention_temperature),
                        calib)

    released_by_mechanism: ClassVar[tuple[str, ...]] = (
        "the adaptive clip norm of each round (a function of the noisy aggregates; it is in operator/metrics.csv "
        "beside values that are not covered)",)

    def secret_randomness(self, sampling_secret: bool) -> Optional[str]:
        if not sampling_secret:
            return None
        return ("client sampling draws from secret operating-system randomness (Python's secrets module) and the "
                "noise from unseeded random ops that TensorFlow seeds from the operating system; no released "
                "output of the run contains either (which clients took part is kept in "
                "operator/participation.jsonl, operator-only)")

    def participation_note(self, sampling_secret: bool) -> str:
        return (" (the secret sampling outcome: released, it would void the amplification by sampling that ε relies "
                "on)." if sampling_secret else " (reproducible from --public_sampling_seed; see the sampling note).")

    @property
    def attentive(self) -> bool:
        return self.aggregation == "attentive"

    @property
    def one_client_per_shard(self) -> bool:
        """A shard sums its clients in plaintext before the aggregation: secure aggregation must see each client's
        update as its own value, and FedAtt must weigh each client's update on its own."""
        return self.secure_aggregation or self.attentive

    def aggregation_section(self) -> dict[str, Any]:
        if not self.attentive:
            return {"rule": "mean", "description": "FedAvg: the mean of the clients' clipped updates, with the "
                                                   "DP query's noise"}
        return {"rule": "attentive", "temperature": self.attention_temperature,
                "description": "FedAtt (Ji et al. 2019): for every weight tensor, the clients' updates weighted by "
                               "a softmax over their distances to the server model; not clipped, no noise"}

    def report_extras(self, entries) -> dict[str, Any]:
        return {"update_noise_multiplier": self.update_noise_multiplier,
                "clipped_count_stddev": self.effective_clipped_count_stddev,
                "secure_aggregation": self.secure_aggregation_section(),
                "aggregation": self.aggregation_section()}

    def secure_aggregation_section(self) -> dict[str, Any]:
        """Who sees a client's clipped update: the report's trust model (README, "Who sees what")."""
        if not self.secure_aggregation:
            return {"enabled": False, "server_sees": "each sampled client's clipped update, before the noise"}
        return {"enabled": True, "server_sees": "only the sum of the cohort's clipped updates, before the noise",
                "protocol": "TFF secure-sum intrinsics (federated_secure_sum_bitwidth, Bonawitz et al. 2017)",
                "quantisation_bits": 32, "coordinate_bound": self.secure_sum_bound,
                "backend": "simulation: TFF's test backend runs the secure sum's quantisation, clipping and modular "
                           "arithmetic in plaintext; the cryptography needs a production backend"}

    # --- schedule ---
    def sampler(self, public_seed: Optional[int] = None) -> "ClientSampler":
        return ClientSampler(self, public_seed)

    # --- TFF ---
    def make_query(self, record_specs=None):
        """The tensorflow-privacy query of TFF's ``gaussian_adaptive`` factory (taken from the factory)."""
        from tff_pipeline import dp_fedavg

        return dp_fedavg.build_aggregator(self)._query  # pinned TFF 0.87; tests compare with TFF's own process

    def build_process(self, task, cfg):
        from tff_pipeline import cohort

        return cohort.build_process(task, cfg, self)

    def read_round(self, m: dict[str, float]) -> tuple[dict[str, float], Optional[float]]:
        """(operator metrics, the clip norm of the round) from the process's flattened measurements."""
        clip = next((v for k, v in m.items() if k.endswith("dp_query_metrics/clip")), None)
        return train_metrics(m), clip

    # --- report ---
    def sampling_section(self) -> dict[str, Any]:
        return {
            "scheme": self.sampling,
            "description": ("Poisson: each client joins each round independently with probability q"
                            if self.sampling == "poisson"
                            else "fixed-size: exactly clients_per_round clients drawn uniformly without replacement"),
            "q": self.sampling_probability, "population": self.population,
            "clients_per_round": self.clients_per_round,
        }

    def report_rows(self) -> list[tuple[str, Any]]:
        if self.attentive:
            return [("Aggregation", f"attentive (FedAtt, Ji et al. 2019; temperature {self.attention_temperature:g})"
                                    f": updates weighted by a softmax over their distances to the server model, "
                                    f"not clipped, no noise")]
        rows = [("Noise multiplier on updates", f"{self.update_noise_multiplier:.6g}"),
                ("Clipped-count noise stddev", f"{self.effective_clipped_count_stddev:.6g}"),
                ("Secure aggregation", f"yes: the server saw only the cohort's sum (32-bit, bound "
                                       f"{self.secure_sum_bound:g}; simulated, TFF test backend; the cryptography "
                                       f"needs a production backend)" if self.secure_aggregation else
                                       "no: the server saw each clipped update")]
        if self.is_private:
            rows.append(("Noise multiplier given to the accountant (std / sensitivity)",
                         f"{self.event_noise_multiplier:.6g}"))
        return rows

    def statement(self, r: dict[str, Any], kind_plan: bool) -> str:
        s = r["sampling"]
        sampled = (f"each client took part in each round independently with probability q = {s['q']:.4g} "
                   f"(Poisson sampling)" if self.sampling == "poisson"
                   else f"each round used exactly {s['clients_per_round']} of {s['population']} clients, drawn "
                        f"without replacement")
        text = (f"It {'will be' if kind_plan else 'was'} trained with {r['mechanism']} for {r['rounds_run']} "
                f"rounds, where {sampled}, with noise multiplier {r['noise_multiplier']:.6g} on the clipped "
                f"updates and the clipped-count estimate together")
        return text

    def statement_tail(self, r: dict[str, Any]) -> str:
        text = ""
        if self.sampling == "fixed":
            text = (f"; under replace-one a client moves the clipped sum by twice the clip norm (and its "
                    f"clipped-count bit by 1), so the accountant's multiplier is z/2 = {r['event_noise_multiplier']:.4g}")
        if self.secure_aggregation:
            return text + (f". The clients' clipped updates reached the server only as a secure sum over the cohort "
                           f"(each coordinate quantised to 32 bits over [-{self.secure_sum_bound:g}, "
                           f"{self.secure_sum_bound:g}]); the server added the noise to that sum, so the guarantee "
                           f"still trusts it to add the noise and keep it secret. This run simulated the secure sum "
                           f"with TFF's test backend (its arithmetic, not its cryptography, which needs a production "
                           f"backend)")
        return text + (". The server sees each sampled client's clipped update before it adds the noise: the "
                       "guarantee is about what the server releases, and trusts the server itself")


def train_metrics(m: dict[str, float]) -> dict[str, float]:
    """The operator's per-round training metrics from the flattened measurements."""
    # (secure_sum_then_finalize adds its own clipping counts per value range: not training metrics)
    train = {k.split("/")[-1]: v for k, v in m.items()
             if k.startswith("client_work/train/") and "/secure_sum_measurements/" not in k}
    if "client_work/fraction_clipped" in m:
        train["fraction_clipped"] = m["client_work/fraction_clipped"]
    for k, v in m.items():
        if k.endswith(("non_finite_updates_zeroed", "non_finite_examples_zeroed", "dp_query_metrics/update_norm",
                       "fedatt/max_weight", "fedatt/effective_clients",
                       "dp_query_metrics/expected_noise_norm", "secure_upper_clipped_count",
                       "secure_lower_clipped_count")):
            train[k.split("/")[-1]] = v
    if "update_norm" in train and "expected_noise_norm" in train:
        # E|s + N|^2 = |s|^2 + E|N|^2: an estimate of the clipped signal's norm (post-processing).
        train["signal_norm_estimate"] = max(train["update_norm"] ** 2 - train["expected_noise_norm"] ** 2, 0.0) ** 0.5
    return train


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

    def __init__(self, mech: DPFedAvgAdaptive, public_seed: Optional[int] = None):
        self.cfg = mech
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

    def plan(self, round_num: int, attempt: int, ledger) -> RoundPlan:
        return RoundPlan(self.sample(round_num, attempt))

    def state(self) -> dict:
        return {}


def check_cohort(population: int, clients_per_round: int) -> None:
    if population < 1:
        raise PrivacyConfigError(f"population={population}: the task has no training clients")
    if clients_per_round < 1:
        raise PrivacyConfigError(f"--clients_per_round={clients_per_round} must be at least 1")
    if clients_per_round > population:
        raise PrivacyConfigError(f"--clients_per_round={clients_per_round} exceeds the population of {population} "
                                 f"training clients; use at most {population}")


def check_noise_delta(noise_multiplier: float, delta: float) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise PrivacyConfigError(f"--noise_multiplier={noise_multiplier} must be a finite number >= 0 (0 means no DP)")
    if not (0 < delta < 1):
        raise PrivacyConfigError(f"--delta={delta} must be in (0, 1); use e.g. 1/population or smaller")


def check_adaptive_clipping(noise_multiplier: float, clients_per_round: int, clipped_count_stddev: Optional[float],
                            population: Optional[int] = None) -> None:
    """Adaptive clipping splits z between the update and the clipped count: the update gets
    z_u = (z^-2 - (2 σ_b)^-2)^-1/2 (Andrew et al. 2021, Thm 1), which exists only if z < 2 σ_b."""
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
            f"--clipped_count_stddev to e.g. {need:.3g}, {more}or lower --noise_multiplier")


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
