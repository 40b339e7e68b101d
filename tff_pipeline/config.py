"""Training configuration: one frozen dataclass, validated with errors that
name the flag, its value and the fix. The library never reads absl FLAGS."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional


from tff_pipeline.errors import UserError


class ConfigError(UserError):
    """A setting is invalid; the message names the flag and the fix."""


MECHANISMS = ("auto", "dp_fedavg", "dp_ftrl", "dp_sgd")  # tff_pipeline.mechanisms.REGISTRY (a test checks)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    task: str = "keyboard"
    output_dir: str = "runs/keyboard"
    rounds: int = 100
    # The DP mechanism (tff_pipeline.mechanisms): auto = the task's privacy unit's (dp_fedavg for a client,
    # dp_sgd for an example), or dp_fedavg, dp_ftrl, dp_sgd.
    mechanism: str = "auto"
    # Privacy (see tff_pipeline.mechanisms for the meaning).
    clients_per_round: int = 20
    sampling: str = "poisson"
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    max_epsilon: Optional[float] = None
    # Adaptive clipping, Andrew et al. 2021 (https://arxiv.org/abs/1905.03871):
    # initial clip C_0, target unclipped quantile γ, clip learning rate η_C
    # (geometric update C <- C·exp(-η_C (b̃ - γ))), clipped-count noise σ_b.
    initial_clip: float = 0.1
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: Optional[float] = None
    # DP-FTRL (Kairouz et al. 2021): the fixed per-client L2 clip norm.
    ftrl_clip: float = 0.1
    # Unit of privacy: client (DP-FedAvg) or example (DP-SGD inside each
    # client, Abadi et al. 2016); auto = the task's default.
    privacy_unit: str = "auto"
    l2_norm_clip: float = 1.0
    local_steps: int = 10
    # Optimisation.
    client_learning_rate: float = 0.5
    server_optimizer: str = "adam"
    server_learning_rate: float = 0.003
    server_momentum: float = 0.9
    batch_size: int = 16
    local_epochs: int = 1
    max_client_examples: int = 64
    # --seed sets data splits, model initialisation and local batching. Client sampling and DP noise draw from
    # secret OS randomness unless --public_sampling_seed is given (research only: cohorts reproducible, NOT
    # secret, so amplification by sampling does not hold against anyone who knows the seed).
    seed: int = 0
    public_sampling_seed: Optional[int] = None
    public_pretrain_epochs: int = 0
    freeze_layers: str = ""
    # Empirical audit (tff_pipeline.audit): membership inference, canaries.
    audit: bool = False
    canaries: int = 0
    canary_clients: int = 1
    canary_repeats: int = 10
    eval_every: int = 10
    # Durability: checkpoint every N rounds (and at the end or a stop), keep
    # the newest K; an existing run directory is resumed unless resume=False.
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    resume: bool = True
    # Execution: running TFF worker services (HOST:PORT,...); empty = one
    # local worker started and stopped by this process.
    workers: str = ""
    # Model / data shape (keyboard).
    vocab_size: int = 10000
    seq_len: int = 20
    model_dim: int = 96
    heads: int = 4
    layers: int = 1
    ff_dim: int = 192
    # Medical task: a user's CSV with the UCI Heart Disease columns.
    medical_data: str = ""
    # Traffic task.
    traffic_data: str = ""
    history: int = 168
    horizon: int = 24
    patch_len: int = 8

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(self.rounds >= 1, f"--rounds={self.rounds} must be at least 1")
        need(self.clients_per_round >= 1, f"--clients_per_round={self.clients_per_round} must be at least 1")
        need(0 < self.delta < 1, f"--delta={self.delta} must be in (0, 1); use e.g. 1e-5 (below 1/population)")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError("give either --noise_multiplier or --target_epsilon, not both")
        if self.noise_multiplier is not None:
            need(self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
                 f"--noise_multiplier={self.noise_multiplier} must be a finite number >= 0 (0 means no DP)")
        if self.target_epsilon is not None:
            need(self.target_epsilon > 0 and math.isfinite(self.target_epsilon),
                 f"--target_epsilon={self.target_epsilon} must be a finite number > 0")
        if self.max_epsilon is not None:
            need(self.max_epsilon > 0 and math.isfinite(self.max_epsilon),
                 f"--max_epsilon={self.max_epsilon} must be a finite number > 0")
            need(self.noise_multiplier != 0,
                 f"--max_epsilon={self.max_epsilon} needs differential privacy, but --noise_multiplier=0 makes ε "
                 f"infinite; set --noise_multiplier > 0 or --target_epsilon")
        need(self.public_sampling_seed is None or self.public_sampling_seed >= 0,
             f"--public_sampling_seed={self.public_sampling_seed} must be >= 0 (leave it unset for secret sampling)")
        need(self.mechanism in MECHANISMS,
             f"--mechanism={self.mechanism!r} must be one of {', '.join(MECHANISMS)}")
        need(self.ftrl_clip > 0 and math.isfinite(self.ftrl_clip), f"--ftrl_clip={self.ftrl_clip} must be > 0")
        need(self.sampling in ("poisson", "fixed"), f"--sampling={self.sampling!r} must be poisson or fixed")
        need(self.privacy_unit in ("auto", "client", "example"),
             f"--privacy_unit={self.privacy_unit!r} must be auto, client or example")
        need(self.l2_norm_clip > 0, f"--l2_norm_clip={self.l2_norm_clip} must be > 0")
        need(self.local_steps >= 1, f"--local_steps={self.local_steps} must be at least 1")
        need(self.initial_clip > 0, f"--initial_clip={self.initial_clip} must be > 0")
        need(0 <= self.target_unclipped_quantile <= 1,
             f"--target_unclipped_quantile={self.target_unclipped_quantile} must be in [0, 1]")
        need(self.clip_learning_rate >= 0, f"--clip_learning_rate={self.clip_learning_rate} must be >= 0")
        need(self.client_learning_rate > 0, f"--client_learning_rate={self.client_learning_rate} must be > 0")
        need(self.server_learning_rate > 0, f"--server_learning_rate={self.server_learning_rate} must be > 0")
        need(self.server_optimizer in ("adam", "sgdm"),
             f"--server_optimizer={self.server_optimizer!r} must be adam or sgdm")
        need(self.public_pretrain_epochs >= 0,
             f"--public_pretrain_epochs={self.public_pretrain_epochs} must be >= 0 (0 = no pre-training)")
        need(self.canaries >= 0, f"--canaries={self.canaries} must be >= 0 (0 = no canaries)")
        need(self.canary_clients >= 1, f"--canary_clients={self.canary_clients} must be at least 1")
        need(self.canary_repeats >= 1, f"--canary_repeats={self.canary_repeats} must be at least 1")
        for name in ("history", "horizon", "patch_len"):
            v = getattr(self, name)
            need(v >= 1, f"--{name}={v} must be at least 1")
        for name in ("batch_size", "local_epochs", "max_client_examples", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "seq_len",
                     "model_dim", "heads", "layers", "ff_dim"):
            v = getattr(self, name)
            need(v >= 1, f"--{name}={v} must be at least 1")
        for w in self.worker_addresses:
            host, _, port = w.rpartition(":")
            need(bool(host) and port.isdigit() and 0 < int(port) < 65536,
                 f"--workers: {w!r} is not HOST:PORT; give e.g. --workers=10.0.0.5:8000,10.0.0.6:8000")
        need(len(set(self.worker_addresses)) == len(self.worker_addresses),
             f"--workers={self.workers} names a worker twice; list each HOST:PORT once")
        need(self.model_dim % self.heads == 0,
             f"--model_dim={self.model_dim} must be divisible by --heads={self.heads}")

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.freeze_layers.split(",") if n.strip())

    @property
    def worker_addresses(self) -> tuple[str, ...]:
        return tuple(w.strip() for w in self.workers.split(",") if w.strip())

    @property
    def noise_is_calibrated(self) -> bool:
        return self.target_epsilon is not None

    def with_privacy_default(self, default_target_epsilon: float) -> "TrainConfig":
        """Private by default: with neither --noise_multiplier nor --target_epsilon, the task's default target ε."""
        if self.noise_multiplier is None and self.target_epsilon is None:
            return dataclasses.replace(self, target_epsilon=default_target_epsilon)
        return self

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def from_json(path: str) -> TrainConfig:
    with open(path) as f:
        d = json.load(f)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in fields})
