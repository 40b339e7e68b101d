"""Distributed DP: the clients add the noise, the server sees only a secure sum.

* Distributed discrete Gaussian (DDG): Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for
  Federated Learning with Secure Aggregation", https://arxiv.org/abs/2102.06387 (Algorithms 1-2; Proposition 14
  for the privacy of the sum). TFF 0.87's ``tff.aggregators.DistributedDpSumFactory(mechanism=
  'distributed_dgauss')``: each client clips its update to L2 norm C, pads and rotates it (randomised Hadamard or
  DFT, a public seed), scales it by s and rounds it stochastically to integers, adds discrete Gaussian noise
  N_Z(0, σ_l²) of its own, and the integers are summed modulo 2^bits by secure aggregation; the server unrotates
  and unscales the noisy sum. No party sees a noiseless update, and the server adds nothing.
* The clip is fixed (``--ddp_clip``): TFF's adaptive clip for this factory adds its clipped-count noise at the
  server, which a distributed guarantee cannot trust.

Accounting (what ``round_event`` records), under replace-one with fixed-size cohorts of m clients (the number of
noise shares in the sum is then always m):

* sensitivity of the rounded, scaled sum: a client's rounded record has L2 norm at most Δ = s·C + √d (randomised
  rounding moves each of the d padded coordinates by less than 1; TFF's ``inflated_l2_norm_bound`` with β = 0,
  checked by the query before noising), so replacing a client moves the sum by at most 2Δ in L2;
* the sum of m independent N_Z(0, σ²) (σ the integer noise scale each client draws: TFF rounds σ_l·s up) satisfies
  Rényi DP of order α with ε(α) ≤ (α/2)(2Δ/(√m σ) + τ√d)², τ = 10 Σ_{k=1}^{m-1} exp(-2π²σ² k/(k+1))
  (Proposition 14's third bound), which is exactly the RDP of a Gaussian mechanism with noise multiplier
  z_eff = 1 / (2Δ/(√m σ) + τ√d). Each round is recorded as ``GaussianDpEvent(z_eff)``; dp_accounting composes them.
* No amplification by sampling is claimed: a curve that dominates the Gaussian's RDP does not make the subsampled
  mechanism dominated by the subsampled Gaussian, so every round counts in full (ε as if every client took part
  in every round). The cohorts are still drawn from secret randomness.
* z_eff is always below the z of a continuous Gaussian with the same total variance (√m σ / (2 s C)), so the discrete
  noise never claims more than the Gaussian would (tests/test_distributed_dp.py checks it).

The modular sum can wrap around when the noisy sum leaves [-2^(bits-1), 2^(bits-1)); TFF chooses s so that this
happens with probability about ``modclip_prob`` per coordinate. A wrap changes the model, not the guarantee (the
server only post-processes the noisy sum).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import dp_accounting
from dp_accounting import dp_event as dpe

from tff_pipeline.mechanisms.base import Mechanism, PrivacyConfigError, Resolved, calibrated, composed
from tff_pipeline.mechanisms.dp_fedavg import ClientSampler, check_cohort, check_noise_delta, train_metrics

ROTATIONS = ("hd", "dft")
MODCLIP_PROB = 1e-4  # TFF's default target probability of a modular wrap per coordinate
MAX_SCALE_FACTOR = 1e6  # TFF 0.87's cap on s (distributed_dp.MAX_SCALE_FACTOR)


@dataclasses.dataclass(frozen=True)
class DistributedDDG(Mechanism):
    """Distributed discrete Gaussian with secure aggregation (Kairouz, Liu, Steinke 2021).

    Attributes:
      population: number of training clients (treated as public).
      clients_per_round: m, the exact cohort size (fixed-size sampling): the number of noise shares in every sum.
      noise_multiplier: z, TFF's central noise stddev over the clip norm before quantisation (σ_central = z·C,
        split into m shares σ_l = z·C/√m). 0 means no DP.
      delta: the δ of the reported (ε, δ).
      l2_clip: C, the fixed per-client L2 clip.
      bits: b, the secure sum's modulus 2^b (TFF allows 1..22).
      rotation: "hd" (randomised Hadamard, pads to a power of 2) or "dft".
      dim: the number of trained coordinates of the model (before padding).
    """

    population: int
    clients_per_round: int
    noise_multiplier: float
    delta: float
    l2_clip: float = 0.1
    bits: int = 20
    rotation: str = "hd"
    dim: int = 0

    name: ClassVar[str] = "distributed_dp"
    title: ClassVar[str] = ("Distributed discrete Gaussian with secure aggregation (Kairouz, Liu, Steinke 2021), TFF "
                            "DistributedDpSumFactory")
    unit: ClassVar[str] = "client"
    relation: ClassVar = dp_accounting.NeighboringRelation.REPLACE_ONE
    relation_text: ClassVar[str] = "replace one client"
    sampling: ClassVar[str] = "fixed"
    cohort_shards: ClassVar[bool] = False  # TFF's per-client process: every client adds its own noise share

    def __post_init__(self):
        check_cohort(self.population, self.clients_per_round)
        check_noise_delta(self.noise_multiplier, self.delta)
        if not (self.l2_clip > 0 and math.isfinite(self.l2_clip)):
            raise PrivacyConfigError(f"--ddp_clip={self.l2_clip} must be a finite number > 0")
        if self.rotation not in ROTATIONS:
            raise PrivacyConfigError(f"--ddp_rotation={self.rotation!r} must be hd or dft")
        if not 1 <= self.bits <= 22:
            raise PrivacyConfigError(f"--ddp_bits={self.bits} must be in 1..22 (TFF's limit)")
        if 2**self.bits < self.clients_per_round or 2 ** (2 * self.bits) < self.clients_per_round * self.k_stddevs**2:
            raise PrivacyConfigError(f"--ddp_bits={self.bits} is too few for {self.clients_per_round} clients per "
                                     f"round: the sum would wrap around; raise --ddp_bits")
        if self.dim < 1:
            raise PrivacyConfigError("distributed_dp needs the model's number of trained coordinates (dim >= 1)")
        if self.is_private and self.noise_scale < 0.5:
            raise PrivacyConfigError(f"--noise_multiplier={self.noise_multiplier:g} gives each client a discrete "
                                     f"Gaussian of scale {self.noise_scale:.3g} < 0.5, outside the analysis "
                                     f"(Kairouz et al. 2021, Prop. 14); raise it")

    # --- what TFF's DistributedDpSumFactory computes from these settings (TFF 0.87, β = 0) ---
    @property
    def k_stddevs(self) -> float:
        from scipy.special import erfcinv

        return math.sqrt(2) * float(erfcinv(MODCLIP_PROB))

    @property
    def padded_dim(self) -> int:
        return 2 ** math.ceil(math.log2(self.dim)) if self.rotation == "hd" else math.ceil(self.dim / 2) * 2

    @property
    def local_stddev(self) -> float:
        """σ_l = z·C/√m, each client's share of the central stddev, before scaling."""
        return self.noise_multiplier * self.l2_clip / math.sqrt(self.clients_per_round)

    @property
    def scale(self) -> float:
        """s: TFF's heuristic scale (k stddevs of the noisy sum fit in 2^b), capped at 1e6."""
        n, d, c, k = self.clients_per_round, self.padded_dim, self.l2_clip, self.k_stddevs
        s = math.sqrt(2.0 ** (2 * self.bits) - n * k**2) / (2 * k * math.sqrt(c**2 * n**2 / d + n * self.local_stddev**2))
        return min(s, MAX_SCALE_FACTOR)

    @property
    def l2_bound(self) -> float:
        """Δ: the L2 bound of one client's scaled, rounded record (TFF's scaled inflated bound, with its 1e-5)."""
        return (self.l2_clip + math.sqrt(self.padded_dim) / self.scale + 1e-5) * self.scale

    @property
    def noise_scale(self) -> float:
        """σ: the integer scale of each client's discrete Gaussian (TFF's sampler rounds σ_l·s up)."""
        return float(math.ceil(self.local_stddev * self.scale)) if self.is_private else 0.0

    @property
    def tau(self) -> float:
        s2 = self.noise_scale**2
        return 10 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, self.clients_per_round))

    @property
    def event_noise_multiplier(self) -> float:
        """z_eff = 1 / (2Δ/(√m σ) + τ√d): the Gaussian whose RDP bounds the round's (Prop. 14), replace-one."""
        m = self.clients_per_round
        return 1.0 / (2 * self.l2_bound / (math.sqrt(m) * self.noise_scale) + self.tau * math.sqrt(self.padded_dim))

    @property
    def gaussian_same_variance_multiplier(self) -> float:
        """The replace-one multiplier of a continuous Gaussian with the sum's variance and no quantisation."""
        return math.sqrt(self.clients_per_round) * self.noise_scale / (2 * self.scale * self.l2_clip)

    @property
    def sampling_probability(self) -> float:
        return self.clients_per_round / self.population

    def round_event(self) -> dpe.DpEvent:
        if not self.is_private:
            return dpe.NonPrivateDpEvent()
        return dpe.GaussianDpEvent(self.event_noise_multiplier)

    def pld_epsilon(self, event, delta: float) -> Optional[float]:
        if not self.is_private or isinstance(event, dpe.NoOpDpEvent):
            return None
        from dp_accounting.pld import pld_privacy_accountant

        return float(composed("pld", pld_privacy_accountant.PLDAccountant, event).get_epsilon(delta))

    def zcdp_rho(self, rounds: int, entries=None) -> Optional[float]:
        """ρ = rounds / (2 z_eff²): Prop. 14's bound is ρ-zCDP per round."""
        if not self.is_private:
            return None
        n = len(entries) if entries is not None else rounds
        return n / (2 * self.event_noise_multiplier**2)

    @classmethod
    def resolve(cls, cfg, task) -> Resolved:
        p = cfg.privacy
        if p.sampling != "fixed":
            raise PrivacyConfigError("--mechanism=distributed_dp needs --sampling=fixed: the clients add the noise, "
                                     "so the sum holds exactly as many noise shares as the cohort has clients")
        dim = trained_coordinates(task, cfg)

        def make(z):
            return cls(task.population, p.clients_per_round, z, p.delta, p.ddp_clip, p.ddp_bits, p.ddp_rotation, dim)

        z, calib = calibrated(make, cfg)
        mech = make(z)
        allow_deep_protos()  # before TFF builds (and parses) the process
        return Resolved(mech, calib)

    population_sets: ClassVar[str] = "the sampling rate q (not used by the accounting, which claims no amplification)"
    sampling_randomness: ClassVar[Optional[str]] = ("not relied on (no amplification by sampling claimed); the noise "
                                                    "is drawn by each client from unseeded random ops")

    def secret_randomness(self, sampling_secret: bool) -> Optional[str]:
        return ("each client draws its discrete Gaussian noise from unseeded TensorFlow random ops (seeded by the "
                "operating system) and no party sees another's share; no amplification by sampling is claimed, so "
                "the guarantee does not rely on keeping the cohorts secret")

    def participation_note(self, sampling_secret: bool) -> str:
        return " (distributed DP claims no amplification: ε does not rely on it being secret, but it says who took part)."

    def report_extras(self, entries) -> dict[str, Any]:
        return {"distributed_dp": {
            "noise": "distributed discrete Gaussian, one share per client", "bits": self.bits,
            "modular_clip_probability": MODCLIP_PROB,
            "rotation": self.rotation, "l2_clip": self.l2_clip, "dim": self.dim, "padded_dim": self.padded_dim,
            "scale": self.scale, "l2_sensitivity_scaled": self.l2_bound, "client_noise_scale": self.noise_scale,
            "tau": self.tau, "event_noise_multiplier": self.event_noise_multiplier,
            "gaussian_same_variance_multiplier": self.gaussian_same_variance_multiplier,
            "backend": "simulation: the clients' noise, rounding and modular arithmetic are real; the secure sum's "
                       "cryptography needs a production backend"},
            "secure_aggregation": {"enabled": True, "server_sees": "only the noisy modular sum of the cohort"}}

    # --- schedule ---
    def sampler(self, public_seed: Optional[int] = None) -> ClientSampler:
        return ClientSampler(self, public_seed)

    # --- TFF ---
    def aggregator(self):
        """The mean of the clients' updates as TFF's ``ddp_secure_aggregator`` builds it (an unweighted mean whose
        sum is the distributed-DP secure sum and whose count is a secure 1-bit sum), with a fixed clip: that exported
        function adapts the clip with noise the server adds. The sum factory is in
        ``tensorflow_federated.python.aggregators.distributed_dp`` (pinned version)."""
        import tensorflow_federated as tff

        return tff.aggregators.UnweightedMeanFactory(
            value_sum_factory=self.sum_factory(),
            count_sum_factory=tff.aggregators.SecureSumFactory(upper_bound_threshold=1, lower_bound_threshold=0))

    def sum_factory(self):
        """TFF's DistributedDpSumFactory (distributed discrete Gaussian, fixed clip, unconditional rounding)."""
        from tensorflow_federated.python.aggregators import distributed_dp

        return distributed_dp.DistributedDpSumFactory(
            noise_multiplier=float(self.noise_multiplier), expected_clients_per_round=int(self.clients_per_round),
            bits=int(self.bits), l2_clip=float(self.l2_clip), modclip_prob=MODCLIP_PROB, beta=0.0,
            mechanism="distributed_dgauss", rotation_type=self.rotation, auto_l2_clip=False)

    def build_process(self, task, cfg):
        import tensorflow_federated as tff

        from tff_pipeline import dp_fedavg

        return tff.learning.algorithms.build_unweighted_fed_avg(
            dp_fedavg.model_fn_for(task, cfg.frozen_layers),
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=cfg.client_learning_rate),
            server_optimizer_fn=dp_fedavg.server_optimizer(cfg),
            model_aggregator=dp_fedavg.zero_non_finite(self.aggregator(), secure=True))

    def read_round(self, m: dict[str, float]) -> tuple[dict[str, float], Optional[float]]:
        train = train_metrics(m)
        for key in ("scaled_inflated_l2", "scaled_local_stddev", "actual_num_clients", "scale_factor"):
            v = next((v for k, v in m.items() if k.endswith("/" + key)), None)
            if v is not None:
                train["ddp_" + key] = v
        return train, self.l2_clip

    # --- report ---
    def sampling_section(self) -> dict[str, Any]:
        return {"scheme": "fixed", "description": "fixed-size: exactly clients_per_round clients drawn uniformly "
                "without replacement (no amplification claimed)", "q": self.sampling_probability,
                "population": self.population, "clients_per_round": self.clients_per_round}

    def report_rows(self) -> list[tuple[str, Any]]:
        return [("Clip norm (fixed)", f"{self.l2_clip:g}"),
                ("Secure sum", f"modulo 2^{self.bits} (s chosen so that a coordinate of the noisy sum wraps around "
                               f"with probability about {MODCLIP_PROB:g}), {self.rotation} rotation, {self.padded_dim} "
                               f"padded coordinates (simulated: TFF test backend; the cryptography needs a production "
                               f"backend)"),
                ("Scale s; sensitivity of a rounded record Δ = s·C + √d", f"{self.scale:.6g}; {self.l2_bound:.6g}"),
                ("Each client's discrete Gaussian scale σ", f"{self.noise_scale:g}"),
                ("Noise multiplier given to the accountant z_eff = 1/(2Δ/(√m σ) + τ√d)",
                 f"{self.event_noise_multiplier:.6g}" if self.is_private else "n/a"),
                ("Continuous Gaussian at the same variance (cross-check, ≥ z_eff)",
                 f"{self.gaussian_same_variance_multiplier:.6g}" if self.is_private else "n/a")]

    def statement(self, r: dict[str, Any], kind_plan: bool) -> str:
        return (f"It {'will be' if kind_plan else 'was'} trained with {r['mechanism']} for {r['rounds_run']} "
                f"rounds of exactly {self.clients_per_round} of {self.population} clients, each client clipping its "
                f"update to L2 norm {self.l2_clip:g}, rounding it to integers at scale {self.scale:.4g} and adding "
                f"discrete Gaussian noise of scale {self.noise_scale:g} itself, summed modulo 2^{self.bits} by "
                f"secure aggregation, so that no party saw a noiseless update (this run simulated the secure sum "
                f"with TFF's test backend: its arithmetic, not its cryptography); each round is accounted as a "
                f"Gaussian mechanism of multiplier {self.event_noise_multiplier:.4g} (Kairouz, Liu, Steinke 2021, "
                f"Prop. 14, replace-one, with the rounding's inflation of the sensitivity), with no amplification "
                f"by sampling")

    def statement_tail(self, r: dict[str, Any]) -> str:
        rho = r.get("zcdp_rho")
        return "" if rho is None else f"; as zero-concentrated DP, ρ = {rho:.4g}"


def allow_deep_protos() -> None:
    """TFF 0.87 builds this mechanism's learning process as a computation proto nested deeper than protobuf's
    C parsers accept by default (upb's depth limit of 100: "DecodeError: Error parsing message"). Their
    ``SetAllowOversizeProtos(True)`` lifts the depth (and 64 MB size) limit for this process; TFF parses only
    protos it serialised itself. The pure-Python parser has no such limit (nothing to do)."""
    from google.protobuf.internal import api_implementation

    kind = api_implementation.Type()
    if kind == "upb":
        from google._upb import _message
    elif kind == "cpp":
        from google.protobuf.pyext import _message
    else:
        return
    _message.SetAllowOversizeProtos(True)


def trained_coordinates(task, cfg) -> int:
    """The number of coordinates the federated rounds train (what the clients clip, noise and sum)."""
    import numpy as np

    from tff_pipeline import dp_fedavg

    model = dp_fedavg.build_keras_model(task, cfg.frozen_layers)
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))
