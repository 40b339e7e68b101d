"""A task: a small frozen bundle of federated data, a Keras model and metrics."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import tensorflow as tf

from tff_pipeline.errors import UserError


class TaskError(UserError):
    """The task's data or settings are unusable; the message says how to fix it."""


@dataclasses.dataclass
class Evaluation:
    """Held-out metrics: ``overall`` {metric: value}, and ``by_client`` {client name: {metric: value}} (a
    table; empty when the task has no per-client evaluation)."""

    overall: dict[str, float]
    by_client: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"overall": self.overall, "by_client": self.by_client}

    @classmethod
    def from_json(cls, d: Optional[dict]) -> Optional["Evaluation"]:
        if not d:
            return None
        if "overall" not in d:  # checkpoints of earlier versions: one flat dict
            return cls(dict(d))
        return cls(d["overall"], d.get("by_client") or {})


@dataclasses.dataclass(frozen=True)
class PersonalClient:
    """One evaluation client's own data for personalization: ``train`` (x, y) arrays to fine-tune on (in the
    shapes the task's loss takes), ``heldout`` what the task's personal metric scores (its held-out part)."""

    name: str
    train: tuple
    heldout: Any


@dataclasses.dataclass(frozen=True)
class Personalization:
    """What personalization (tff_pipeline.personalize) needs from a task.

    Attributes:
      clients: (at most n clients, 0 = all; validation) -> list[PersonalClient]. With ``validation`` each
        client's training part is split: it fine-tunes on the earlier 80% and is scored on the rest, never on
        its held-out part (for choosing the personalization settings).
      metric: (Keras model, a client's ``heldout``) -> {metric: value} on that client.
      headline: the metric the gain is reported on; ``higher_is_better`` says which way is better.
      head: names of the model's output layer(s), what --personalize_layers=head fine-tunes.
      client_is: what one client is ("hospital", "sensor", "user"), for the report and the plot.
      count: how many clients ``clients(0, False)`` gives (with a limit below it, a fixed public draw of them).
      excluded: which evaluation clients are not personalized and why ("" when none are).
    """

    clients: Callable[[int, bool], list]
    metric: Callable[[Any, Any], dict]
    headline: str
    higher_is_better: bool
    head: tuple
    client_is: str
    count: int
    excluded: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything the training loop needs to know about one task.

    Attributes:
      name: registry name.
      population: number of training clients (the sampler draws from 0..N-1).
      client_dataset: (client index, round seed) -> tf.data.Dataset of
        (x, y) batches for that client's local training this round.
      build_model: () -> a fresh, uncompiled Keras model.
      loss: () -> the Keras loss.
      metrics: () -> a list of fresh Keras metrics of the clients' training batches in the rounds (the
        operator-only ``train_*`` columns); held-out metrics are ``evaluate``'s.
      evaluate: Keras model -> Evaluation on the held-out sets: overall
        metrics and, for cross-silo tasks, a table of metrics per client.
      export: (Keras model, directory) -> writes a SavedModel there.
      serving_module: optional Keras model -> the tf.Module that export saves (``serve``; ``serve_on_device``
        when the on-device call differs), for the TensorFlow Lite export (tff_pipeline.tflite).
      tflite_unsupported: why the serving module cannot become a TensorFlow Lite model (the converter's words,
        tff_pipeline.tflite.Unsupported; a test converts it and checks them), so that a run says it without the
        seconds a failing conversion costs; "" to convert.
      device_examples: optional n -> (n held-out inputs of the on-device call, their labels or None), for the
        TensorFlow Lite export's agreement and latency check.
      summary: facts about the data for config.json and the report.
      privacy_unit: what one client is, in words, for the report.
      record_is: what one example (record) is, for example-level reports.
      headline_metric: the eval metric printed in progress lines.
      public_data: optional (x, y) arrays from public sources (never from
        the clients), for central pre-training at no privacy cost.
      audit: optional (model, participating client ids, seed) -> attack
        scores (see tff_pipeline.audit).
      default_privacy_unit: "client" (DP-FedAvg) or "example" (DP-SGD in
        each client) when --privacy_unit=auto.
      example_counts, client_names: per client, for example-level accounting.
      rows_per_record: example level: a record (the unit DP-SGD samples and
        clips) is this many consecutive rows of a client's data (1: a row).
      adapter_rank: the rank of the model's low-rank adapters (0: none); with
        them only the adapters train in the federated rounds.
      tuning: how hyperparameter tuning relates to this run's clients (users
        set apart for it, or a tuning run on them), for the report; "" when
        the task sets no users apart.
      personalization: optional Personalization: each evaluation client's own training and held-out parts,
        the per-client metric and the model's head, for fine-tuning the released model on each client
        (tff_pipeline.personalize, --personalize); None: the task has none.
    """

    name: str
    population: int
    client_dataset: Callable[[int, int], tf.data.Dataset]
    build_model: Callable[[], tf.keras.Model]
    loss: Callable[[], tf.keras.losses.Loss]
    metrics: Callable[[], list]
    evaluate: Callable[[tf.keras.Model], "Evaluation"]
    export: Callable[[tf.keras.Model, str], None]
    summary: dict[str, Any]
    privacy_unit: str
    headline_metric: str
    public_data: Any = None
    public_data_source: str = ""
    audit: Any = None
    default_privacy_unit: str = "client"
    example_counts: tuple = ()
    client_names: tuple = ()
    record_is: str = "one example"
    rows_per_record: int = 1
    adapter_rank: int = 0
    tuning: str = ""
    serving_module: Any = None
    tflite_unsupported: str = ""
    device_examples: Any = None
    personalization: Any = None

    def __post_init__(self):
        if self.population < 1:
            raise TaskError(f"task {self.name!r} has no training clients")
        spec = self.client_dataset(0, 0).element_spec
        model = self.build_model()
        x_spec = spec[0]
        for got, want in zip([x_spec], model.inputs):
            if got.dtype != want.dtype or not tf.TensorShape(got.shape[1:]).is_compatible_with(want.shape[1:]):
                raise TaskError(
                    f"task {self.name!r}: client data element_spec {got} does not match the model input "
                    f"{want.dtype.name}{want.shape}"
                )

    @property
    def element_spec(self):
        return self.client_dataset(0, 0).element_spec


def matching_baselines(headline: str, baselines: dict) -> dict[str, float]:
    """The baselines that measure the headline metric: those whose name ends as it does (test_top1_accuracy:
    bigram_top1; test_h1_mae: persistence_h1_mae)."""
    tail = headline.split("_", 1)[1].replace("_accuracy", "") if "_" in headline else headline
    return {k: float(v) for k, v in (baselines or {}).items()
            if isinstance(v, (int, float)) and (k.endswith(tail) or k.endswith(tail + "_accuracy"))}


def numeric_column(column):
    """A data column as numbers: (values, None), or (None, (label, text)) of
    the first entry that is present but not a number, for the caller's error
    message. Empty cells stay NaN (missing)."""
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce")
    bad = column[values.isna() & column.notna()]
    if len(bad):
        return None, (bad.index[0], bad.iloc[0])
    return values, None
