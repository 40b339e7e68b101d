"""What every DP mechanism shares: its accountant, its ledger entries, its
events and their JSON form, and calibration from a target ε.

A mechanism is one frozen object (modelled on jax_privacy's
``DPExecutionPlan``): its neighbouring relation, its client schedule, the
``DpEvent`` of each released round, the composition of a run's ledger,
calibration and the TFF process all come from the same fields, so they
cannot disagree. Nothing here imports TensorFlow.

dp_accounting's noise multiplier is std / l2-sensitivity under the
mechanism's relation (``event_noise_multiplier``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any, ClassVar, Optional, Sequence

import dp_accounting
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from tff_pipeline.errors import UserError


class PrivacyConfigError(UserError):
    """A privacy setting is invalid; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """Who takes part in one round, and what the round adds to the ledger.

    ``clients``: the cohort (indices into the training clients). ``tree``:
    DP-FTRL's tree index (None for other mechanisms). ``restart``: start a
    fresh tree (fresh secret noise seed) before this round."""

    clients: Any
    tree: Optional[int] = None
    restart: bool = False


class Mechanism:
    """The interface every mechanism implements (subclasses are frozen dataclasses).

    Class attributes: ``name`` (the --mechanism value), ``title`` (report
    text), ``unit`` ("client" or "example"), ``relation`` (dp_accounting's
    NeighboringRelation). Subclasses define ``noise_multiplier`` and
    ``delta`` fields and the methods that raise NotImplementedError here."""

    name: ClassVar[str]
    title: ClassVar[str]
    unit: ClassVar[str]
    relation: ClassVar[dp_accounting.NeighboringRelation]
    relation_text: ClassVar[str]
    noise_multiplier: float
    delta: float

    # --- privacy ---
    @property
    def is_private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def event_noise_multiplier(self) -> float:
        """std / l2-sensitivity of one release under ``relation`` (z unless the subclass says otherwise)."""
        return self.noise_multiplier

    @property
    def neighboring_relation(self) -> str:
        return self.relation_text

    def round_event(self) -> dpe.DpEvent:
        """The DpEvent of one released round (what a ledger line records)."""
        raise NotImplementedError

    def ledger_entry(self, plan: RoundPlan) -> dict[str, Any]:
        """The fields a ledger line records for a round run with ``plan``."""
        return {"event": event_to_json(self.round_event())}

    def compose(self, entries: Sequence[dict]) -> dpe.DpEvent:
        """The DpEvent of a run whose ledger holds ``entries``: the round
        events composed (runs of equal events as SelfComposedDpEvent). A torn
        line (crash mid-append, no event) counts as one round event."""
        if not self.is_private:
            return dpe.NonPrivateDpEvent()
        events = [event_from_json(e["event"]) if "event" in e else self.round_event() for e in entries]
        return collapse(events)

    def planned_entries(self, rounds: int) -> list[dict]:
        """The ledger a run of ``rounds`` rounds would write (no crash)."""
        return [self.ledger_entry(RoundPlan(None)) for _ in range(rounds)]

    def training_event(self, rounds: int) -> dpe.DpEvent:
        return self.compose(self.planned_entries(rounds))

    def accountant(self) -> rdp.RdpAccountant:
        return rdp.RdpAccountant(neighboring_relation=self.relation)

    def epsilon_of(self, event: dpe.DpEvent) -> tuple[float, Optional[float]]:
        """(ε, best RDP order) of ``event`` at this mechanism's δ; (inf, None) without DP."""
        if not self.is_private:
            return math.inf, None
        if isinstance(event, dpe.NoOpDpEvent):
            return 0.0, None
        eps, order = composed(f"rdp-{self.relation.name}", self.accountant, event).get_epsilon_and_optimal_order(
            self.delta)
        return float(eps), float(order)

    def epsilon(self, rounds: int) -> tuple[float, Optional[float]]:
        if rounds == 0 and self.is_private:
            return 0.0, None
        return self.epsilon_of(self.training_event(rounds))

    def pld_epsilon(self, event: dpe.DpEvent, delta: float) -> Optional[float]:
        """ε from the PLD accountant (a cross-check); None where PLD does not support the event."""
        return None

    def zcdp_rho(self, rounds: int, entries: Optional[Sequence[dict]] = None) -> Optional[float]:
        """ρ of zero-concentrated DP where it applies (None otherwise)."""
        return None

    def report_extras(self, entries: Sequence[dict]) -> dict[str, Any]:
        """Fields only this mechanism's report has."""
        return {}

    # What the report and the run directory's release notes say that depends on the mechanism.
    released_by_mechanism: ClassVar[tuple[str, ...]] = ()  # released values it computes from the noisy aggregates
    population_sets: ClassVar[str] = "the sampling rate q"  # what the (public) population size sets
    sampling_randomness: ClassVar[Optional[str]] = None  # the report's row, where not "secret"/"public" sampling
    checkpoint_note: ClassVar[str] = ("checkpoints/: the training state (covered) with the latest held-out metrics "
                                      "in meta.json (not covered).")

    def public_sizes(self, population: int) -> str:
        """The population sizes this mechanism uses (treated as public) and what they set."""
        return f"the number of training clients ({population}), which sets {self.population_sets}"

    def secret_randomness(self, sampling_secret: bool) -> Optional[str]:
        """What the guarantee relies on being unknown to the adversary; None when it is not (public sampling)."""
        raise NotImplementedError

    def participation_note(self, sampling_secret: bool) -> str:
        """What operator/participation.jsonl is, for this mechanism."""
        raise NotImplementedError

    def before_round(self, process, state, plan: RoundPlan):
        """The process state to run ``plan``'s round from (DP-FTRL restarts its tree here)."""
        return state



@dataclasses.dataclass(frozen=True)
class Resolved:
    """The run's mechanism, how z was chosen, and (example level) each client's own mechanism."""

    mechanism: Mechanism
    calibration: Optional[dict]
    per_client: Optional[dict] = None


def calibration(cfg, z: float) -> dict:
    return {"target_epsilon": cfg.privacy.target_epsilon, "rounds": cfg.rounds, "calibrated_noise_multiplier": z}


def calibrated(make, cfg) -> tuple[float, Optional[dict]]:
    p = cfg.privacy
    if p.target_epsilon is None:
        return p.noise_multiplier, None
    z = calibrate(make, cfg.rounds, p.target_epsilon, p.delta)
    return z, calibration(cfg, z)


_COMPOSED: "collections.OrderedDict[tuple[str, str], Any]" = collections.OrderedDict()
COMPOSED_CACHE_SIZE = 32


def composed(kind: str, make_accountant, event: dpe.DpEvent) -> "ComposedEvent":
    """``make_accountant().compose(event)``, read-only, remembered for the last ``COMPOSED_CACHE_SIZE`` (kind,
    accountant, event) keys, one LRU for every kind. ``kind`` names the accountant and its neighbouring relation;
    the accountant's qualified name is in the key too. What comes back only reads ε (it cannot be composed
    further), so one composition serves every reader: the report's ε at four δ, the budget guard's look-ahead that
    the next round's progress line asks for again, calibration's repeated checks. Composing the same event twice
    gives the same accountant, so this changes no number, only how often dp_accounting computes it."""
    name = getattr(make_accountant, "__qualname__", repr(make_accountant))
    key = (kind, name, json.dumps(event_to_json(event), sort_keys=True, default=repr))
    acc = _COMPOSED.get(key)
    if acc is None:
        acc = _COMPOSED[key] = ComposedEvent(make_accountant().compose(event))
        while len(_COMPOSED) > COMPOSED_CACHE_SIZE:
            _COMPOSED.popitem(last=False)
    _COMPOSED.move_to_end(key)
    return acc


class ComposedEvent:
    """A composed dp_accounting accountant that can only be read: ε at a δ (and RDP's optimal order)."""

    __slots__ = ("_acc",)

    def __init__(self, acc):
        self._acc = acc

    def get_epsilon(self, delta: float) -> float:
        return self._acc.get_epsilon(delta)

    def get_epsilon_and_optimal_order(self, delta: float):
        return self._acc.get_epsilon_and_optimal_order(delta)


def collapse(events: Sequence[dpe.DpEvent]) -> dpe.DpEvent:
    """Composes events, runs of equal ones as SelfComposedDpEvent; one run stays one SelfComposedDpEvent."""
    if not events:
        return dpe.NoOpDpEvent()
    runs: list[list] = []
    for ev in events:
        if runs and runs[-1][0] == ev:
            runs[-1][1] += 1
        else:
            runs.append([ev, 1])
    parts = [dpe.SelfComposedDpEvent(ev, n) for ev, n in runs]
    return parts[0] if len(parts) == 1 else dpe.ComposedDpEvent(parts)


Z_STEP = 1e-4


def round_up(z: float) -> float:
    """z rounded up to a multiple of 1e-4 (a noise multiplier may only grow when rounded)."""
    return round(math.ceil(round(z / Z_STEP, 6)) * Z_STEP, 4)


def check_target(target_epsilon: float, rounds: int) -> None:
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"--target_epsilon={target_epsilon} must be a finite number > 0")
    if rounds < 1:
        raise PrivacyConfigError(f"--rounds={rounds} must be at least 1")


def calibrate(make_mech, rounds: int, target_epsilon: float, delta: float) -> float:
    """Smallest noise multiplier z on a 1e-4 grid with RDP ε(make_mech(z), rounds) <= target."""
    check_target(target_epsilon, rounds)
    probe = make_mech(1.0)
    z = float(dp_accounting.calibrate_dp_mechanism(
        probe.accountant, lambda z: make_mech(z).training_event(rounds), target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.01, 1.0), tol=1e-4))
    # Rounded up to 4 decimals (never to the nearest), so the z that is printed, stored and used is one value
    # and its ε never exceeds the target.
    z = round_up(z)
    while make_mech(z).epsilon(rounds)[0] > target_epsilon:
        z = round_up(z + Z_STEP)
    while z > Z_STEP and make_mech(round(z - Z_STEP, 4)).epsilon(rounds)[0] <= target_epsilon:
        z = round(z - Z_STEP, 4)  # the search's tolerance: the smallest z on the 1e-4 grid
    return z


def affordable_rounds(mech: Mechanism, target_epsilon: float, limit: int = 10_000_000) -> int:
    """The most rounds whose RDP ε stays <= target_epsilon (0 if not even one)."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"--target_epsilon={target_epsilon} must be a finite number > 0")
    if not mech.is_private:
        raise PrivacyConfigError("--noise_multiplier=0 gives no DP, so no number of rounds fits a finite ε; "
                                 "set --noise_multiplier > 0")
    if mech.epsilon(1)[0] > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi <= limit and mech.epsilon(hi)[0] <= target_epsilon:
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit
    while hi - lo > 1:  # ε(lo) <= target < ε(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mech.epsilon(mid)[0] <= target_epsilon else (lo, mid)
    return lo


# --- DpEvent (de)serialisation, so anyone can recompute ε from a report or a ledger. ---

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
        dpe.SingleEpochTreeAggregationDpEvent,
    )
}


def event_to_json(event: dpe.DpEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in dataclasses.fields(event) if dataclasses.is_dataclass(event) else event.__attrs_attrs__:
        v = getattr(event, f.name)
        if isinstance(v, dpe.DpEvent):
            v = event_to_json(v)
        elif isinstance(v, (list, tuple)):
            v = [event_to_json(e) if isinstance(e, dpe.DpEvent) else e for e in v]
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
            v = [event_from_json(e) if isinstance(e, dict) else e for e in v]
        kwargs[k] = v
    return cls(**kwargs)
