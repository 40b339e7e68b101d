"""DP-FTRL: tree-aggregated noise, no sampling assumption (Gboard's production method).

* Kairouz et al. 2021, "Practical and Private (Deep) Learning without
  Sampling or Shuffling", https://arxiv.org/abs/2103.00039 (DP-FTRL, the
  tree-restart accounting of its appendix D).
* Xu et al. 2023, "Federated Learning of Gboard Language Models with
  Differential Privacy", https://arxiv.org/abs/2305.18465 (DP-FTRL in
  production; ρ-zCDP reported).
* TFF's ``DifferentiallyPrivateFactory.tree_aggregation``: each client's
  update is clipped to ``l2_norm_clip``; the server adds the noise of a binary
  tree (std ``noise_multiplier`` × clip per node) to the cumulative sum and
  releases the residual of each round, which a server SGD/momentum
  optimizer applies.

Schedule (owned and enforced here): each epoch is a fresh secret shuffle of
the population cut into cohorts of ``clients_per_round``; the clients left
over take no part in that epoch. A new tree, with a fresh secret noise seed,
starts at every epoch (and when a resumed run lost released rounds), and a
client takes part at most once per tree; the sampler refuses anything else.

Accounting: under replace-one-with-a-zero-client (dp_accounting's
REPLACE_SPECIAL; a client's clipped update moves each tree node it enters by
at most C, so the multiplier is z, no factor 2), tree k of n_k steps is
``SingleEpochTreeAggregationDpEvent(z, n_k)`` (RDP α·⌈log2(n_k+1)⌉/(2z²)),
and the run is their composition: the ledger records the tree of every
released round. No amplification by sampling is claimed, so the cohorts need
not be secret (they are drawn secretly anyway).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

import dp_accounting
from dp_accounting import dp_event as dpe

from tff_pipeline.mechanisms.base import (Mechanism, PrivacyConfigError, Resolved, RoundPlan, calibrated, collapse,
                                          event_to_json)
from tff_pipeline.mechanisms.dp_fedavg import check_cohort, check_noise_delta, train_metrics


@dataclasses.dataclass(frozen=True)
class DPFTRL(Mechanism):
    """DP-FTRL with tree restarts every epoch.

    Attributes:
      population: number of training clients (treated as public).
      clients_per_round: the exact cohort size; an epoch has
        population // clients_per_round rounds (one tree).
      noise_multiplier: z, the noise std per tree node over the clip norm
        (Kairouz et al. 2021, Alg. 1). 0 means no DP.
      delta: the δ of the reported (ε, δ).
      l2_norm_clip: C, the fixed per-client L2 clip norm.
    """

    population: int
    clients_per_round: int
    noise_multiplier: float
    delta: float
    l2_norm_clip: float = 0.1

    name: ClassVar[str] = "dp_ftrl"
    title: ClassVar[str] = ("DP-FTRL (Kairouz et al. 2021): tree-aggregated noise, restarted every epoch, TFF "
                            "tree_aggregation aggregator")
    unit: ClassVar[str] = "client"
    relation: ClassVar = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    relation_text: ClassVar[str] = "replace one client's data with nothing (a client that sends a zero update)"
    sampling: ClassVar[str] = "epochs"

    def __post_init__(self):
        check_cohort(self.population, self.clients_per_round)
        check_noise_delta(self.noise_multiplier, self.delta)
        if not (self.l2_norm_clip > 0 and math.isfinite(self.l2_norm_clip)):
            raise PrivacyConfigError(f"--l2_norm_clip={self.l2_norm_clip} must be a finite number > 0")

    @property
    def rounds_per_epoch(self) -> int:
        return self.population // self.clients_per_round

    @property
    def sampling_probability(self) -> float:
        return 1.0  # no amplification claimed

    # --- events ---
    def round_event(self) -> dpe.DpEvent:
        if not self.is_private:
            return dpe.NonPrivateDpEvent()
        return dpe.SingleEpochTreeAggregationDpEvent(self.noise_multiplier, 1)

    def ledger_entry(self, plan: RoundPlan) -> dict[str, Any]:
        return {"event": event_to_json(self.round_event()), "tree": plan.tree}

    def tree_sizes(self, entries: Sequence[dict]) -> list[int]:
        """Steps per tree, in order. A torn line (no tree) counts as a tree of its own."""
        sizes, last = [], object()
        for e in entries:
            tree = e.get("tree", object())
            if sizes and tree == last:
                sizes[-1] += 1
            else:
                sizes.append(1)
            last = tree
        return sizes

    def compose(self, entries: Sequence[dict]) -> dpe.DpEvent:
        if not self.is_private:
            return dpe.NonPrivateDpEvent()
        return collapse([dpe.SingleEpochTreeAggregationDpEvent(self.noise_multiplier, n)
                         for n in self.tree_sizes(entries)])

    def planned_entries(self, rounds: int) -> list[dict]:
        k = self.rounds_per_epoch
        return [{"tree": r // k} for r in range(rounds)]

    def zcdp_rho(self, rounds: int, entries: Optional[Sequence[dict]] = None) -> Optional[float]:
        """ρ = Σ_trees ⌈log2(n_k+1)⌉ / (2 z²): a client enters at most that many nodes of each tree,
        each with noise z·C (Kairouz et al. 2021, App. D; Xu et al. 2023 report ρ)."""
        if not self.is_private:
            return None
        sizes = self.tree_sizes(entries if entries is not None else self.planned_entries(rounds))
        return sum(math.ceil(math.log2(n + 1)) for n in sizes) / (2 * self.noise_multiplier**2)

    @classmethod
    def resolve(cls, cfg, task) -> Resolved:
        p = cfg.privacy
        if p.sampling != "poisson":
            raise PrivacyConfigError(f"--sampling={p.sampling} does not apply to --mechanism=dp_ftrl, which samples "
                                     f"nobody (each epoch is a shuffled pass in cohorts); drop --sampling")

        def make(z):
            return cls(task.population, p.clients_per_round, z, p.delta, p.ftrl_clip)

        z, calib = calibrated(make, cfg)
        return Resolved(make(z), calib)

    population_sets: ClassVar[str] = "the number of rounds per epoch"
    sampling_randomness: ClassVar[Optional[str]] = ("not relied on (no amplification by sampling claimed); tree noise "
                                                    "seeds secret (operating system)")
    checkpoint_note: ClassVar[str] = (
        "checkpoints/: the training state, which holds DP-FTRL's secret tree noise seed and un-noised partial tree "
        "sums (released, it would void the guarantee), with the latest held-out metrics in meta.json.")

    def secret_randomness(self, sampling_secret: bool) -> Optional[str]:
        return ("the tree's noise draws from a secret seed taken from the operating system (Python's secrets "
                "module) at every new tree, never from the clock; it lives only in the training state "
                "(checkpoints/, operator-only). No amplification by sampling is claimed, so the guarantee "
                "does not rely on keeping the cohorts secret")

    def participation_note(self, sampling_secret: bool) -> str:
        return " (DP-FTRL's schedule: ε does not rely on it being secret, but it says who took part)."

    def report_extras(self, entries) -> dict[str, Any]:
        return {"tree_sizes": self.tree_sizes(entries)}

    # --- schedule ---
    def sampler(self, public_seed: Optional[int] = None) -> "EpochSchedule":
        return EpochSchedule(self, public_seed)

    # --- TFF ---
    def make_query(self, record_specs):
        import tensorflow_federated as tff

        return tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
            noise_multiplier=float(self.noise_multiplier), clients_per_round=float(self.clients_per_round),
            l2_norm_clip=float(self.l2_norm_clip), record_specs=record_specs)._query  # pinned TFF 0.87

    def build_process(self, task, cfg):
        from tff_pipeline import cohort

        return cohort.build_process(task, cfg, self, restartable=True)

    def before_round(self, process, state, plan: RoundPlan):
        """A new tree: the query state restarted with a fresh secret noise seed (never the clock-derived
        seed TFF's query uses by default, which anyone could guess)."""
        if plan.restart:
            seeds = np.array([secrets.randbits(62), secrets.randbits(62)], np.int64)
            state = process.restart_tree(state, seeds)
        return state

    def read_round(self, m: dict[str, float]) -> tuple[dict[str, float], Optional[float]]:
        return train_metrics(m), self.l2_norm_clip

    # --- report ---
    def sampling_section(self) -> dict[str, Any]:
        return {"scheme": "epochs",
                "description": "no sampling assumed: each epoch is a shuffled pass over the clients in cohorts; a "
                               "client takes part at most once per epoch (one tree per epoch)",
                "q": 1.0, "population": self.population, "clients_per_round": self.clients_per_round,
                "rounds_per_epoch": self.rounds_per_epoch}

    def report_rows(self) -> list[tuple[str, Any]]:
        return [("Clip norm (fixed)", f"{self.l2_norm_clip:g}"),
                ("Rounds per epoch (one tree each)", self.rounds_per_epoch)]

    def statement(self, r: dict[str, Any], kind_plan: bool) -> str:
        trees = r.get("tree_sizes") or []
        return (f"It {'will be' if kind_plan else 'was'} trained with {r['mechanism']} for {r['rounds_run']} "
                f"rounds of {self.clients_per_round} clients, each epoch a shuffled pass over the {self.population} "
                f"clients in which a client takes part at most once, with a new noise tree per epoch ("
                f"{len(trees)} tree(s) of {', '.join(map(str, trees))} steps), noise multiplier "
                f"{r['noise_multiplier']:.6g} per tree node" + ("" if kind_plan else
                                                                 f" and a fixed clip norm {self.l2_norm_clip:g}"))

    def statement_tail(self, r: dict[str, Any]) -> str:
        rho = r.get("zcdp_rho")
        return "" if rho is None else f"; as zero-concentrated DP, ρ = {rho:.4g}"


class EpochSchedule:
    """DP-FTRL's participation schedule: each epoch a fresh secret shuffle cut
    into cohorts; a client at most once per tree, checked on every plan.

    The state (tree, epoch order, position) goes into the checkpoint, so a
    resumed run continues the same epoch; when a resumed run lost released
    rounds (the ledger holds more than the checkpoint), a new tree and a new
    epoch start instead, so no tree noise is ever reused."""

    def __init__(self, mech: DPFTRL, public_seed: Optional[int] = None):
        self.mech = mech
        self.public_seed = public_seed
        self.secret = public_seed is None  # ε does not rely on it: no amplification is claimed
        self.tree = -1
        self.order: list[int] = []
        self.pos = 0
        self.in_tree: set[int] = set()

    def _rng(self):
        if self.public_seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([self.public_seed, self.tree, 0xF7])

    def _new_tree(self) -> None:
        self.tree += 1
        self.order = [int(i) for i in self._rng().permutation(self.mech.population)]
        self.pos = 0
        self.in_tree = set()

    def plan(self, round_num: int, attempt: int, ledger) -> RoundPlan:
        k = self.mech.clients_per_round
        restart = self.tree < 0 or self.pos + k > len(self.order)
        if restart:
            self._new_tree()
        cohort = self.order[self.pos:self.pos + k]
        self.pos += k
        if self.in_tree.intersection(cohort):
            raise RuntimeError("DP-FTRL schedule: a client would take part twice in one tree")
        self.in_tree.update(cohort)
        return RoundPlan(np.asarray(sorted(cohort)), tree=self.tree, restart=restart)

    def state(self) -> dict:
        return {"tree": self.tree, "order": self.order, "pos": self.pos}

    def restore(self, saved: Optional[dict], lost_rounds: bool, last_tree: Optional[int]) -> None:
        """Continues the checkpointed epoch, or (lost rounds, or no saved state) starts a new tree
        after the last tree in the ledger."""
        if saved and not lost_rounds:
            self.tree, self.order, self.pos = saved["tree"], list(saved["order"]), saved["pos"]
            self.in_tree = set(self.order[:self.pos])
            self.resumed_restart = False
        else:
            self.tree = -1 if last_tree is None else int(last_tree)
            self.order, self.pos = [], 0  # the next plan starts tree last_tree + 1
            self.resumed_restart = True
