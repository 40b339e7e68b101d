"""Example-level DP: DP-SGD inside each client (Abadi et al. 2016,
https://arxiv.org/abs/1607.00133), for cross-silo data where the unit to
protect is one record (e.g. a hospital visit), not a whole client."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import numpy as np

import dp_accounting
from dp_accounting import dp_event as dpe

from tff_pipeline.mechanisms.base import Mechanism, PrivacyConfigError, Resolved, RoundPlan, calibrated, composed
from tff_pipeline.mechanisms.dp_fedavg import train_metrics


@dataclasses.dataclass(frozen=True)
class DPSGDInClient(Mechanism):
    """Each round, each client takes ``local_steps`` DP-SGD steps; each step
    Poisson-samples its batch with q = batch_size / examples_per_client, clips
    every example's gradient to ``l2_norm_clip`` and adds Gaussian noise of
    ``noise_multiplier`` × clip. A record is in one client, so its privacy is
    that client's composition over all local steps of all rounds (counted as
    if the client took part in every round: no amplification by client
    sampling is claimed). ``examples_per_client`` is the accounted client's
    (the smallest: largest q, largest ε). With ``sampling_rate`` set, every
    client samples with that one q (expected batch q × its own records), so
    every client's round event, hence every client's ε, is the same; then
    ``batch_size`` is only the accounted client's expected batch, rounded."""

    examples_per_client: int
    batch_size: int
    local_steps: int
    noise_multiplier: float
    delta: float
    sampling: str = "poisson"
    l2_norm_clip: float = 1.0
    clients: int = 1  # every client takes part in every round
    sampling_rate: Optional[float] = None  # one q for every client (--example_sampling_rate)

    name: ClassVar[str] = "dp_sgd"
    title: ClassVar[str] = "DP-SGD inside each client (Abadi et al. 2016): per-example clipping and Gaussian noise"
    unit: ClassVar[str] = "example"
    relation: ClassVar = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    relation_text: ClassVar[str] = "add or remove one example (one record) in one client's data"

    def __post_init__(self):
        for name in ("examples_per_client", "batch_size", "local_steps"):
            v = getattr(self, name)
            if v < 1:
                raise PrivacyConfigError(f"--{name}={v} must be at least 1")
        if self.sampling_rate is not None and not 0 < self.sampling_rate <= 1:
            raise PrivacyConfigError(f"--example_sampling_rate={self.sampling_rate} must be in (0, 1]; e.g. 0.5")
        if self.sampling_rate is None and self.batch_size > self.examples_per_client:
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
        if self.sampling_rate is not None:
            return self.sampling_rate
        return self.batch_size / self.examples_per_client

    def round_event(self) -> dpe.DpEvent:
        if not self.is_private:
            return dpe.NonPrivateDpEvent()
        return dpe.SelfComposedDpEvent(
            dpe.PoissonSampledDpEvent(self.sampling_probability, dpe.GaussianDpEvent(self.noise_multiplier)),
            self.local_steps)

    def pld_epsilon(self, event, delta: float) -> Optional[float]:
        if not self.is_private or isinstance(event, dpe.NoOpDpEvent):
            return None
        from dp_accounting.pld import pld_privacy_accountant

        return float(composed("pld", pld_privacy_accountant.PLDAccountant, event).get_epsilon(delta))

    def zcdp_rho(self, rounds: int, entries=None) -> Optional[float]:
        if not self.is_private or self.sampling_probability < 1:
            return None
        return rounds * self.local_steps / (2 * self.noise_multiplier**2)

    def sampler(self, public_seed: Optional[int] = None) -> "EveryClient":
        return EveryClient(self.clients)

    def build_process(self, task, cfg):
        from tff_pipeline import dp_sgd

        return dp_sgd.build_process(task, cfg, self, cfg.frozen_layers)

    def read_round(self, m: dict[str, float]) -> tuple[dict[str, float], Optional[float]]:
        return train_metrics(m), self.l2_norm_clip

    @classmethod
    def resolve(cls, cfg, task) -> Resolved:
        """The accounted client is the one with the fewest examples (largest q, hence largest ε: the guarantee
        every record gets); each client's own mechanism is in ``per_client``."""
        if not task.example_counts:
            raise PrivacyConfigError(f"--privacy_unit=example: task {task.name!r} does not support example-level "
                                     f"DP; use --privacy_unit=client")
        n_min, p = min(task.example_counts), cfg.privacy
        rate = p.example_sampling_rate

        def make(z, n=n_min):
            batch = cfg.batch_size if rate is None else max(1, round(rate * n))
            return cls(n, batch, p.local_steps, z, p.delta, "poisson", p.l2_norm_clip, task.population, rate)

        z, calib = calibrated(make, cfg)
        mechs = {name: (n, make(z, n)) for name, n in zip(task.client_names, task.example_counts)}
        per_client = {name: {"examples": n, "q": m.sampling_probability, "mechanism": m}
                      for name, (n, m) in mechs.items()}
        return Resolved(make(z), calib, per_client)

    def public_sizes(self, population: int) -> str:
        return (f"the number of training clients ({population}) and each client's number of training records "
                f"(examples; traffic: record blocks holding a whole training window, a count that depends on the "
                f"blocks' missing hours), "
                f"which sets its DP-SGD sampling rate q" + (" and its expected batch q × records, the divisor of its "
                                                            "noisy gradient sum" if self.sampling_rate is not None
                                                            else ""))

    def secret_randomness(self, sampling_secret: bool) -> Optional[str]:
        # nothing records DP-SGD's batches
        return ("DP-SGD's batch sampling and noise draw from unseeded random ops that TensorFlow seeds from the "
                "operating system; no output of the run contains them")

    def participation_note(self, sampling_secret: bool) -> str:
        return " (every client in every round; nothing in it is secret)."

    def sampling_section(self) -> dict[str, Any]:
        return {"scheme": "poisson",
                "description": "Poisson: inside a client, each example joins each DP-SGD batch independently with "
                               "probability q",
                "q": self.sampling_probability, "examples_per_client": self.examples_per_client,
                "batch_size": self.batch_size, "local_steps_per_round": self.local_steps,
                "equal_rate": self.sampling_rate is not None}

    def report_rows(self) -> list[tuple[str, Any]]:
        if self.sampling_rate is not None:
            return [("Sampling rate q (every client)", f"{self.sampling_rate:g}"),
                    ("Expected batch size", "q × the client's records (table below)"),
                    ("Local DP-SGD steps per round", self.local_steps)]
        return [("Examples per client", self.examples_per_client), ("Expected batch size", self.batch_size),
                ("Local DP-SGD steps per round", self.local_steps)]

    def statement(self, r: dict[str, Any], kind_plan: bool) -> str:
        s = r["sampling"]
        if s.get("equal_rate"):
            return (f"Each client runs {r['mechanism']}, {s['local_steps_per_round']} steps per round for "
                    f"{r['rounds_run']} rounds, where each of its examples joins each batch independently with the "
                    f"same probability q = {s['q']:.4g} in every client (Poisson sampling; expected batch q times the "
                    f"client's records), with noise multiplier {r['noise_multiplier']:.6g}. Every client's round is "
                    f"the same DP event, so every client's records get the same ε. Every round is counted, as if the "
                    f"record's client took part in all of them")
        return (f"Each client runs {r['mechanism']}, {s['local_steps_per_round']} steps per round for "
                f"{r['rounds_run']} rounds, where each of its {s['examples_per_client']} examples joins each batch "
                f"independently with probability q = {s['q']:.4g} (Poisson sampling, expected batch "
                f"{s['batch_size']}), with noise multiplier {r['noise_multiplier']:.6g}. Every round is counted, as "
                f"if the record's client took part in all of them")

    def statement_tail(self, r: dict[str, Any]) -> str:
        return ""


class EveryClient:
    """Cross-silo rounds: every client, every round (no sampling claimed;
    participation is public by design, so nothing here is secret)."""

    secret = True

    def __init__(self, n: int):
        self.n = n

    def sample(self, round_num: int, attempt: int = 0):
        return np.arange(self.n)

    def plan(self, round_num: int, attempt: int, ledger) -> RoundPlan:
        return RoundPlan(self.sample(round_num, attempt))

    def state(self) -> dict:
        return {}


_NEEDS_RATE = ("--mechanism=dp_sgd_server samples every record with one rate: give --example_sampling_rate=q "
               "(e.g. 0.5)")


@dataclasses.dataclass(frozen=True)
class DPSGDServerNoise(DPSGDInClient):
    """DP-SGD over the union of every client's records (Abadi et al. 2016), one step per round, with the noise
    added once by the server: each client Poisson-samples each of its records with the same q, clips each record's
    gradient to ``l2_norm_clip`` and sends the sum; the server adds N(0, (z·clip)²) to the sum over clients and
    divides by q × ``total_records``. Adding or removing one record moves that sum by at most the clip, so each
    round is one Poisson-sampled Gaussian with multiplier z, as for DP-SGD in one client: the same ε for every
    record, with sqrt(clients) times less noise on the mean gradient than each client noising its own. The price is
    trust: the server sees each client's sum of clipped gradients before the noise (as DP-FedAvg's server sees the
    clipped updates); the guarantee is against everyone who sees the released model and metrics."""

    total_records: int = 0  # every client's records: q × this is the divisor (public sizes)

    name: ClassVar[str] = "dp_sgd_server"
    title: ClassVar[str] = ("DP-SGD over every client's records (Abadi et al. 2016): per-record clipping in the "
                            "clients, Gaussian noise added once by the server")

    def __post_init__(self):
        super().__post_init__()
        if self.sampling_rate is None:
            raise PrivacyConfigError(_NEEDS_RATE)
        if self.local_steps != 1:
            raise PrivacyConfigError(f"--local_steps={self.local_steps}: --mechanism=dp_sgd_server takes one DP-SGD "
                                     f"step per round (the server adds each step's noise); use --local_steps=1 and "
                                     f"more --rounds")
        if self.total_records < 1:
            raise PrivacyConfigError(f"total_records={self.total_records} must be at least 1")

    @property
    def expected_batch(self) -> float:
        """The divisor of the noisy sum: q × every client's records."""
        return self.sampling_rate * self.total_records

    def build_process(self, task, cfg):
        from tff_pipeline import dp_sgd

        return dp_sgd.build_server_noise_process(task, cfg, self, cfg.frozen_layers)

    @classmethod
    def resolve(cls, cfg, task) -> Resolved:
        """One mechanism for every record (one q, one noisy sum); ``per_client`` lists each client with it."""
        if not task.example_counts:
            raise PrivacyConfigError(f"--mechanism=dp_sgd_server: task {task.name!r} has no example-level data; use "
                                     f"--privacy_unit=client")
        p, total = cfg.privacy, int(sum(task.example_counts))
        if p.example_sampling_rate is None:  # checked before make() computes the batch from it
            raise PrivacyConfigError(_NEEDS_RATE)

        def make(z, n=min(task.example_counts)):
            return cls(n, max(1, round(p.example_sampling_rate * n)), p.local_steps, z, p.delta, "poisson",
                       p.l2_norm_clip, task.population, p.example_sampling_rate, total)

        z, calib = calibrated(make, cfg)
        per_client = {name: {"examples": n, "q": p.example_sampling_rate, "mechanism": make(z, n)}
                      for name, n in zip(task.client_names, task.example_counts)}
        return Resolved(make(z), calib, per_client)

    def public_sizes(self, population: int) -> str:
        return (f"the number of training clients ({population}) and each client's number of training records "
                f"(traffic: record blocks holding a whole training window, a count that depends on the blocks' "
                f"missing hours); their total ({self.total_records}) times q is the divisor of the noisy gradient sum")

    def secret_randomness(self, sampling_secret: bool) -> Optional[str]:
        return ("each client's record sampling and the server's noise draw from unseeded random ops that TensorFlow "
                "seeds from the operating system; no output of the run contains them")

    def sampling_section(self) -> dict[str, Any]:
        return {**super().sampling_section(), "total_records": self.total_records,
                "expected_batch": self.expected_batch, "noise_added_by": "server"}

    def report_rows(self) -> list[tuple[str, Any]]:
        return [("Sampling rate q (every record of every client)", f"{self.sampling_rate:g}"),
                ("Expected batch size", f"q × all clients' records = {self.expected_batch:g}"),
                ("DP-SGD steps per round", 1),
                ("Noise added by", "the server, once per step, to the sum over clients")]

    def statement(self, r: dict[str, Any], kind_plan: bool) -> str:
        s = r["sampling"]
        return (f"Each of the {r['rounds_run']} rounds is one DP-SGD step over every client's records: every client "
                f"samples each of its records independently with the same probability q = {s['q']:.4g} (Poisson "
                f"sampling), clips each sampled record's gradient and sends their sum; the server adds Gaussian noise "
                f"with noise multiplier {r['noise_multiplier']:.6g} once to the sum over all clients and divides by "
                f"the expected batch (q × {s['total_records']} records). One record moves that sum by at most the "
                f"clip, so every record gets the same ε")

    def statement_tail(self, r: dict[str, Any]) -> str:
        return ("; the server sees each client's sum of clipped gradients before it adds the noise (as a DP-FedAvg "
                "server sees clipped updates), so this guarantee holds against everyone who sees the released model, "
                "metrics and report, not against the server itself (with --mechanism=dp_sgd each client adds its own "
                "noise and need not trust the server, at sqrt(clients) times more noise on the mean gradient)")
