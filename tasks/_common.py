"""Plumbing every task shares: the model-shape settings, a client's local
dataset for a round, batched inference into Keras metrics, and saving a
serving module."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tff_pipeline import models
from tff_pipeline.config import need, need_positive_ints, setting


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The shape of a task's attention model: settings every task has (each task's ``Settings`` extends it)."""

    model_dim: int = setting(96, "Model width.")
    heads: int = setting(4, "Attention heads.")
    layers: int = setting(1, "Transformer blocks.")
    ff_dim: int = setting(192, "Feed-forward width.")

    def __post_init__(self):
        need_positive_ints(self, ("model_dim", "heads", "layers", "ff_dim"))
        need(self.model_dim % self.heads == 0, f"--model_dim={self.model_dim} must be divisible by --heads={self.heads}")


def local_dataset(x, y, client: int, round_seed: int, cfg) -> tf.data.Dataset:
    """Client ``client``'s training data for one round: at most
    --max_client_examples of its examples (a fresh random subset each round),
    shuffled, repeated --local_epochs times, in batches of --batch_size."""
    if len(x) > cfg.max_client_examples:
        pick = np.random.default_rng([round_seed, client]).choice(len(x), cfg.max_client_examples, replace=False)
        x, y = x[pick], y[pick]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.shuffle(len(x), seed=round_seed).repeat(cfg.local_epochs).batch(cfg.batch_size)


def batched_outputs(model: tf.keras.Model, x, batch: int):
    """(start, model outputs) for each batch of ``x``, through one traced inference function."""
    from tff_pipeline import progress

    infer = models.inference_fn(model)
    for start in range(0, len(x), batch):
        yield start, infer(x[start : start + batch])
        progress.report(min(start + batch, len(x)), len(x), "examples")


def update_metrics(model: tf.keras.Model, metrics: list, x, y, batch: int) -> dict[str, float]:
    """Keras metrics of ``model`` on (x, y), computed batch by batch; {name: value}."""
    for start, out in batched_outputs(model, x, batch):
        for m in metrics:
            m.update_state(y[start : start + batch], out)
    return {m.name: float(m.result()) for m in metrics}


def save_serving(module: tf.Module, path: str) -> None:
    """Writes ``module`` as a SavedModel whose ``serving_default`` is ``module.serve``."""
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
