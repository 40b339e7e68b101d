"""Training configuration in three parts, each validated with errors that name
the flag, its value and the fix:

* ``PrivacySettings``: the DP mechanism's settings (tff_pipeline.mechanisms).
  Every one is fixed for the life of a run: resuming with another value is
  refused, because the accounting must describe one mechanism.
* ``TrainConfig`` itself: the run's settings (task, rounds, optimisation,
  durability, execution); a field whose metadata says ``resumable`` may
  change when a run is resumed.
* the task's own settings (``tasks/<name>.Settings``: data files, window
  lengths, model shape), owned by the task module.

On the command line all three are flat ``--flags`` (``make`` splits them); in
config.json they are one flat ``config`` object. The library never reads
absl FLAGS."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Optional

from tff_pipeline.errors import UserError


class ConfigError(UserError):
    """A setting is invalid; the message names the flag and the fix."""


def setting(default, help: str, resumable: bool = False, accounting: bool = False):
    """A flag: its default and --help text. ``resumable``: may differ when a run is resumed. ``accounting``: a
    run setting the privacy accounting depends on (a change is refused with that reason)."""
    return dataclasses.field(default=default, metadata={"help": help, "resumable": resumable,
                                                        "accounting": accounting})


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def need_positive_ints(obj, names) -> None:
    for name in names:
        v = getattr(obj, name)
        need(v >= 1, f"--{name}={v} must be at least 1")


PERSONALIZE_LAYERS = ("all", "head", "adapters")  # tff_pipeline.personalize
AGGREGATIONS = ("mean", "attentive")  # tff_pipeline.fedatt
META_LEARNING = ("none", "reptile")
MECHANISMS = ("auto", "dp_fedavg", "dp_ftrl", "dp_sgd", "dp_sgd_server", "distributed_dp")  # tff_pipeline.mechanisms.REGISTRY (a test checks)


@dataclasses.dataclass(frozen=True)
class PrivacySettings:
    """What the DP mechanism is built from (tff_pipeline.mechanisms says what each one means for it)."""

    mechanism: str = setting("auto", "DP mechanism: dp_fedavg (DP-FedAvg with adaptive clipping, sampled cohorts), "
                             "dp_ftrl (DP-FTRL, Kairouz et al. 2021: tree-aggregated noise, no sampling assumption, "
                             "epochs of shuffled cohorts), dp_sgd (DP-SGD inside each client, record level), dp_sgd_server (DP-SGD "
                             "over every client's records, one step per round, the noise added once by a trusted "
                             "server: sqrt(clients) times less noise), distributed_dp (the clients add discrete "
                             "Gaussian noise, summed by secure aggregation; Kairouz et al. 2021), or auto "
                             "(the task's privacy unit's).")
    privacy_unit: str = setting("auto", "Unit of privacy: client (DP-FedAvg, user level), example (DP-SGD inside "
                                "each client, record level: hospital visits), or auto (the task's default: keyboard "
                                "client, medical example).")
    clients_per_round: int = setting(20, "Expected (poisson) or exact (fixed) number of clients per round.")
    sampling: str = setting("poisson", "Client sampling: poisson (q = clients_per_round/population) or fixed "
                            "(without replacement).")
    noise_multiplier: Optional[float] = setting(
        None, "Total Gaussian noise multiplier z (McMahan et al. 2018; includes the adaptive-clipping share, Andrew "
        "et al. 2021). 0 = no DP (only when asked for). Unset with no --target_epsilon: the task's default target ε "
        "(keyboard 3, medical 10, traffic 10).")
    target_epsilon: Optional[float] = setting(None, "Calibrate z with dp_accounting so that ε <= this after "
                                              "--rounds rounds at --delta.")
    delta: float = setting(1e-5, "δ of the (ε, δ) guarantee; keep it well below 1/population.")
    public_sampling_seed: Optional[int] = setting(
        None, "Research only: draw client cohorts from this seed (reproducible). The cohorts are then NOT secret: "
        "against anyone who knows the seed, amplification by sampling does not hold; the report says so and gives ε "
        "without it. Unset (default): secret sampling.")
    # Adaptive clipping, Andrew et al. 2021 (https://arxiv.org/abs/1905.03871): C <- C·exp(-η_C (b̃ - γ)).
    initial_clip: float = setting(0.1, "Initial L2 clip norm C_0 of adaptive clipping (Andrew et al. 2021).")
    target_unclipped_quantile: float = setting(0.5, "Target fraction γ of client updates left unclipped (Andrew et "
                                               "al. 2021).")
    clip_learning_rate: float = setting(0.2, "Learning rate η_C of the geometric clip update (Andrew et al. 2021); "
                                        "0 holds the clip at --initial_clip.")
    clipped_count_stddev: Optional[float] = setting(None, "Noise stddev σ_b on the clipped count (Andrew et al. "
                                                    "2021). Default 0.05 x clients_per_round; z must stay below 2 σ_b.")
    secure_aggregation: bool = setting(
        False, "Client-level DP-FedAvg: the clients' clipped updates reach the server only as a secure sum over the "
        "cohort (TFF's secure-sum intrinsics: 32-bit quantisation over [-B, B], modular sum); the server adds the "
        "noise to that sum (Bonawitz et al. 2017). Simulated with TFF's test backend: the arithmetic is real, the "
        "cryptography needs a production backend (README, 'Who sees what').", accounting=True)
    secure_sum_bound: float = setting(
        100.0, "--secure_aggregation: each coordinate of a client's clipped update is clipped to [-B, B] and "
        "quantised to 32 bits before the secure sum; keep B above the clip norm (no coordinate of a clipped update "
        "exceeds it).", accounting=True)
    aggregation: str = setting(
        "mean", "How the server combines the clients' updates: mean (FedAvg: the DP query's clipped, noised mean) "
        "or attentive (FedAtt, Ji et al. 2019: per weight tensor, a softmax over each client's distance to the "
        "server model; not differentially private, so only with --noise_multiplier=0).", accounting=True)
    attention_temperature: float = setting(
        1.0, "--aggregation=attentive: temperature T of the softmax over distances (1 = Ji et al. 2019; larger T "
        "moves toward the plain mean).", accounting=True)
    ddp_clip: float = setting(0.1, "--mechanism=distributed_dp: the fixed per-client L2 clip norm C (Kairouz, Liu, "
                              "Steinke 2021).", accounting=True)
    ddp_bits: int = setting(20, "--mechanism=distributed_dp: the secure sum works modulo 2^bits (1..22); more bits, "
                            "finer quantisation (Kairouz, Liu, Steinke 2021, Sec. 4).", accounting=True)
    ddp_rotation: str = setting("hd", "--mechanism=distributed_dp: the rotation that flattens updates before "
                                "quantisation: hd (randomised Hadamard) or dft.", accounting=True)
    ftrl_clip: float = setting(0.1, "DP-FTRL: the fixed per-client L2 clip norm of the updates (Kairouz et al. "
                               "2021).")
    l2_norm_clip: float = setting(1.0, "Per-example L2 clip of DP-SGD (--privacy_unit=example; Abadi et al. 2016).")
    local_steps: int = setting(10, "DP-SGD steps per client per round (--privacy_unit=example); --batch_size is the "
                               "expected Poisson batch size.")
    example_sampling_rate: Optional[float] = setting(
        None, "DP-SGD (--privacy_unit=example): every client Poisson-samples each of its records into each batch with "
        "this one probability q (expected batch q x its records), so every client's records get the same ε; unset: "
        "every client's expected batch is --batch_size, and the smallest client (largest q) sets ε.")

    def __post_init__(self):
        need(self.mechanism in MECHANISMS, f"--mechanism={self.mechanism!r} must be one of {', '.join(MECHANISMS)}")
        need(self.privacy_unit in ("auto", "client", "example"),
             f"--privacy_unit={self.privacy_unit!r} must be auto, client or example")
        need(self.clients_per_round >= 1, f"--clients_per_round={self.clients_per_round} must be at least 1")
        need(self.sampling in ("poisson", "fixed"), f"--sampling={self.sampling!r} must be poisson or fixed")
        need(0 < self.delta < 1, f"--delta={self.delta} must be in (0, 1); use e.g. 1e-5 (below 1/population)")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError("give either --noise_multiplier or --target_epsilon, not both")
        if self.noise_multiplier is not None:
            need(self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
                 f"--noise_multiplier={self.noise_multiplier} must be a finite number >= 0 (0 means no DP)")
        if self.target_epsilon is not None:
            need(self.target_epsilon > 0 and math.isfinite(self.target_epsilon),
                 f"--target_epsilon={self.target_epsilon} must be a finite number > 0")
        need(self.public_sampling_seed is None or self.public_sampling_seed >= 0,
             f"--public_sampling_seed={self.public_sampling_seed} must be >= 0 (leave it unset for secret sampling)")
        need(self.initial_clip > 0, f"--initial_clip={self.initial_clip} must be > 0")
        need(0 <= self.target_unclipped_quantile <= 1,
             f"--target_unclipped_quantile={self.target_unclipped_quantile} must be in [0, 1]")
        need(self.clip_learning_rate >= 0, f"--clip_learning_rate={self.clip_learning_rate} must be >= 0")
        need(self.secure_sum_bound > 0 and math.isfinite(self.secure_sum_bound),
             f"--secure_sum_bound={self.secure_sum_bound} must be a finite number > 0")
        need(self.aggregation in AGGREGATIONS,
             f"--aggregation={self.aggregation!r} must be one of {', '.join(AGGREGATIONS)}")
        need(self.attention_temperature > 0 and math.isfinite(self.attention_temperature),
             f"--attention_temperature={self.attention_temperature} must be a finite number > 0")
        need(self.ftrl_clip > 0 and math.isfinite(self.ftrl_clip), f"--ftrl_clip={self.ftrl_clip} must be > 0")
        need(self.l2_norm_clip > 0, f"--l2_norm_clip={self.l2_norm_clip} must be > 0")
        need(self.local_steps >= 1, f"--local_steps={self.local_steps} must be at least 1")
        need(self.example_sampling_rate is None or 0 < self.example_sampling_rate <= 1,
             f"--example_sampling_rate={self.example_sampling_rate} must be in (0, 1]; e.g. 0.5")

    @property
    def noise_is_calibrated(self) -> bool:
        return self.target_epsilon is not None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run's settings, its ``privacy`` settings and its task's ``task_settings``."""

    task: str = setting("keyboard", "Task to train: keyboard, medical or traffic.", accounting=True)
    output_dir: str = setting("runs/keyboard", "Run directory for config.json, the privacy report, saved_model/ "
                              "and operator/.", resumable=True)
    rounds: int = setting(100, "Federated rounds to run (planned; the accountant counts rounds actually run).",
                          resumable=True)
    max_epsilon: Optional[float] = setting(
        None, "Budget guard: before each round, stop if running it would bring ε above this (the model and report "
        "are still written, and say why training stopped).", resumable=True)
    # Optimisation.
    client_learning_rate: float = setting(0.5, "Client SGD learning rate.")
    server_optimizer: str = setting("adam", "Server optimizer: adam or sgdm.")
    server_learning_rate: float = setting(0.003, "Server optimizer learning rate.")
    server_momentum: float = setting(0.9, "Server momentum (sgdm).")
    batch_size: int = setting(16, "Client batch size.", accounting=True)
    local_epochs: int = setting(1, "Local epochs per round.")
    max_client_examples: int = setting(64, "At most this many examples per client per round (a fresh random subset "
                                       "each round).", accounting=True)
    seed: int = setting(0, "Seed for data splits, model initialisation and local batching. Client sampling and DP "
                        "noise use secret OS randomness, never written anywhere.", accounting=True)
    public_pretrain_epochs: int = setting(0, "Epochs of central pre-training on the task's public data (not the "
                                          "clients'; no privacy cost) before federated training. 0 = start from "
                                          "random weights.")
    freeze_layers: str = setting("", "Comma-separated Keras layer names kept fixed during federated training (e.g. "
                                 "token_embedding,logits after public pre-training): fewer trained parameters, less "
                                 "DP noise.")
    # Empirical audit (tff_pipeline.audit).
    audit: bool = setting(False, "After training, attack the model: client-level membership inference (training vs "
                          "unseen clients) and, with --canaries, secret-sharer exposure; results in "
                          "operator/audit.json and the report.", resumable=True)
    canaries: int = setting(0, "Secret-sharer canaries (Carlini et al. 2019): random phrases inserted into clients' "
                            "training data, for --audit. 0 = none. They change the training data: use only for audit "
                            "runs.")
    canary_clients: int = setting(1, "Clients that hold each canary.")
    canary_repeats: int = setting(10, "Copies of the canary in each of those clients' training data.")
    tflite: str = setting("float16", "Also export model.tflite for TensorFlow Lite (phones): float16 weights, int8 "
                          "(dynamic-range quantisation: int8 weights, float activations) or none.", resumable=True)
    # Personalization (tff_pipeline.personalize): on each evaluation client, after training; changes no release.
    personalize: bool = setting(False, "After training, each evaluation client fine-tunes the released model on its "
                                "own training part and is scored on its own held-out part, before and after "
                                "(operator/personalization.json, .png; per-client columns in "
                                "operator/heldout_by_client.csv). Nothing leaves the client and nothing is "
                                "released: the guarantee of the global model is unchanged.", resumable=True)
    personalize_steps: int = setting(10, "--personalize: local SGD steps of --batch_size examples on each client "
                                     "(0: evaluate the global model only; every gain is then 0). The defaults (10 "
                                     "steps, learning rate 0.03, all weights) were chosen on the clients' training "
                                     "parts (scripts/personalize.py --validation), never on held-out data.",
                                     resumable=True)
    personalize_learning_rate: float = setting(0.03, "--personalize: learning rate of the local SGD steps.",
                                               resumable=True)
    personalize_layers: str = setting("all", "--personalize: what each client fine-tunes: all (every weight), head "
                                      "(the output layer(s): keyboard logits, medical logit, traffic linear_skip "
                                      "and attention_head) or adapters (the low-rank adapters; keyboard with "
                                      "--lora_rank > 0).", resumable=True)
    personalize_clients: int = setting(200, "--personalize: at most this many evaluation clients, a fixed public "
                                       "draw when there are more (keyboard: 200 of its seen users; medical and "
                                       "traffic have fewer, so all). 0 = all.", resumable=True)
    meta_learning: str = setting(
        "none", "none, or reptile: a meta-learned starting point for personalization (Reptile, Nichol et al. 2018; "
        "for federated learning Jiang et al. 2019). Each sampled client's local work becomes exactly the adaptation "
        "--personalize runs (--personalize_steps SGD steps of --batch_size examples at "
        "--personalize_learning_rate, cycling over its examples) and it sends that adapted delta, clipped and "
        "noised as any update (the same DP guarantee); the server's step toward the adapted models is the server "
        "optimizer's (the meta step). Client-level mechanisms with cohorts (dp_fedavg, dp_ftrl).")
    # Durability.
    eval_every: int = setting(10, "Evaluate on held-out data every N rounds.", resumable=True)
    checkpoint_every: int = setting(10, "Checkpoint the full training state every N rounds (also at the end and on "
                                    "a stop).", resumable=True)
    keep_checkpoints: int = setting(3, "Keep the newest N checkpoints.", resumable=True)
    resume: bool = setting(True, "Resume an earlier run found in --output_dir from its last checkpoint (every round "
                           "it released stays counted); --resume=false refuses to touch it.", resumable=True)
    # Execution.
    workers: str = setting("", "Run on running TFF worker services, HOST:PORT,... (start each with TFF's "
                           "worker_binary, see README); each round's cohort is split across them. Empty: one local "
                           "worker, started and stopped by this run.", resumable=True)
    workers_tls_ca: str = setting("", "--workers over mutual TLS: the CA (PEM) that signed the workers' "
                                  "certificates (scripts/worker.py --tls_cert).", resumable=True)
    workers_tls_cert: str = setting("", "--workers over mutual TLS: this coordinator's certificate (PEM), signed by "
                                    "the CA the workers trust (their --tls_client_ca).", resumable=True)
    workers_tls_key: str = setting("", "--workers over mutual TLS: the private key (PEM) of --workers_tls_cert.",
                                   resumable=True)
    privacy: PrivacySettings = dataclasses.field(default_factory=PrivacySettings)
    # The task's own settings (tasks/<name>.Settings); None for a task outside the registry (the bench's).
    task_settings: Any = None

    def __post_init__(self):
        need(self.rounds >= 1, f"--rounds={self.rounds} must be at least 1")
        if self.max_epsilon is not None:
            need(self.max_epsilon > 0 and math.isfinite(self.max_epsilon),
                 f"--max_epsilon={self.max_epsilon} must be a finite number > 0")
            need(self.privacy.noise_multiplier != 0,
                 f"--max_epsilon={self.max_epsilon} needs differential privacy, but --noise_multiplier=0 makes ε "
                 f"infinite; set --noise_multiplier > 0 or --target_epsilon")
        need(self.client_learning_rate > 0, f"--client_learning_rate={self.client_learning_rate} must be > 0")
        need(self.server_learning_rate > 0, f"--server_learning_rate={self.server_learning_rate} must be > 0")
        need(self.server_optimizer in ("adam", "sgdm"),
             f"--server_optimizer={self.server_optimizer!r} must be adam or sgdm")
        need(self.public_pretrain_epochs >= 0,
             f"--public_pretrain_epochs={self.public_pretrain_epochs} must be >= 0 (0 = no pre-training)")
        need(self.tflite in ("float16", "int8", "none"), f"--tflite={self.tflite!r} must be float16, int8 or none")
        need(self.personalize_steps >= 0, f"--personalize_steps={self.personalize_steps} must be >= 0")
        need(self.personalize_learning_rate > 0 and math.isfinite(self.personalize_learning_rate),
             f"--personalize_learning_rate={self.personalize_learning_rate} must be a finite number > 0")
        need(self.personalize_layers in PERSONALIZE_LAYERS,
             f"--personalize_layers={self.personalize_layers!r} must be one of {', '.join(PERSONALIZE_LAYERS)}")
        need(self.personalize_clients >= 0, f"--personalize_clients={self.personalize_clients} must be >= 0 "
                                            f"(0 = all)")
        need(self.personalize_layers != "adapters" or getattr(self.task_settings, "lora_rank", 0) > 0,
             f"--personalize_layers=adapters: the {self.task} model has no adapters (only keyboard with "
             f"--lora_rank > 0 has them); use all or head")
        need(self.meta_learning in META_LEARNING,
             f"--meta_learning={self.meta_learning!r} must be one of {', '.join(META_LEARNING)}")
        need(self.meta_learning == "none" or self.personalize_steps >= 1,
             f"--meta_learning={self.meta_learning} adapts with --personalize_steps steps, but "
             f"--personalize_steps={self.personalize_steps}; set it to at least 1")
        need(self.canaries >= 0, f"--canaries={self.canaries} must be >= 0 (0 = no canaries)")
        need_positive_ints(self, ("canary_clients", "canary_repeats", "batch_size", "local_epochs",
                                  "max_client_examples", "eval_every", "checkpoint_every", "keep_checkpoints"))
        for w in self.worker_addresses:
            host, _, port = w.rpartition(":")
            need(bool(host) and port.isdigit() and 0 < int(port) < 65536,
                 f"--workers: {w!r} is not HOST:PORT; give e.g. --workers=10.0.0.5:8000,10.0.0.6:8000")
        need(len(set(self.worker_addresses)) == len(self.worker_addresses),
             f"--workers={self.workers} names a worker twice; list each HOST:PORT once")
        tls = (self.workers_tls_ca, self.workers_tls_cert, self.workers_tls_key)
        need(not any(tls) or bool(self.worker_addresses),
             "--workers_tls_ca/--workers_tls_cert/--workers_tls_key secure the channels to --workers; give "
             "--workers=HOST:PORT,... or drop them")
        need(not (self.privacy.secure_aggregation and self.worker_addresses),
             f"--secure_aggregation runs on the local worker: with --workers={self.workers} TFF would merge the "
             f"workers' partial sums in plaintext; drop one of the two")

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.freeze_layers.split(",") if n.strip())

    @property
    def worker_addresses(self) -> tuple[str, ...]:
        return tuple(w.strip() for w in self.workers.split(",") if w.strip())

    @property
    def workers_tls(self):
        """The coordinator's mutual-TLS settings for --workers (tff_pipeline.tls.ClientTls), or None."""
        from tff_pipeline import tls

        return tls.ClientTls.from_flags(self.workers_tls_ca, self.workers_tls_cert, self.workers_tls_key)

    def with_privacy_default(self, default_target_epsilon: float) -> "TrainConfig":
        """Private by default: with neither --noise_multiplier nor --target_epsilon, the task's default target ε."""
        p = self.privacy
        if p.noise_multiplier is None and p.target_epsilon is None:
            return dataclasses.replace(self, privacy=dataclasses.replace(p, target_epsilon=default_target_epsilon))
        return self

    def replace(self, **flat) -> "TrainConfig":
        """A copy with some flags changed, whichever part each belongs to."""
        return make(**{**self.to_json(), **flat})

    def to_json(self) -> dict:
        """Every flag of this run, flat (config.json's ``config``)."""
        return {**{f.name: getattr(self, f.name) for f in run_fields()},
                **dataclasses.asdict(self.privacy),
                **(dataclasses.asdict(self.task_settings) if self.task_settings is not None else {})}


def run_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in ("privacy", "task_settings")]


PRIVACY_NAMES = frozenset(f.name for f in dataclasses.fields(PrivacySettings))


def kind_of(name: str) -> str:
    """How a changed flag is judged on resume: 'resumable', 'privacy' (the mechanism, and settings marked
    ``accounting``: they set the population or the sampling), or 'state' (the saved training state belongs to the
    old value)."""
    run = {f.name: f for f in run_fields()}
    if name in run:
        meta = run[name].metadata
        return "resumable" if meta["resumable"] else "privacy" if meta["accounting"] else "state"
    if name in PRIVACY_NAMES:
        return "privacy"
    for cls in all_task_settings().values():
        for f in dataclasses.fields(cls):
            if f.name == name and f.metadata.get("accounting"):
                return "privacy"
    return "state"


def make(strict: bool = True, **flat) -> TrainConfig:
    """A TrainConfig from flat flag values. The task's own settings go to its ``Settings``; with ``strict`` a setting
    of another task is refused (--history is traffic's), without it dropped (an older config.json held them all)."""
    run_names = {f.name for f in run_fields()}
    run = {k: v for k, v in flat.items() if k in run_names}
    privacy = PrivacySettings(**{k: v for k, v in flat.items() if k in PRIVACY_NAMES})
    rest = {k: v for k, v in flat.items() if k not in run_names and k not in PRIVACY_NAMES and v is not None}
    task = run.get("task", TrainConfig.task)
    settings_cls = task_settings_class(task)
    own = {f.name for f in dataclasses.fields(settings_cls)} if settings_cls else set()
    foreign = sorted(set(rest) - own)
    if foreign and strict:
        owners = [t for t, cls in all_task_settings().items() if foreign[0] in {f.name for f in dataclasses.fields(cls)}]
        where = f"a setting of the {' and '.join(owners)} task" if owners else "not a setting of any task"
        raise ConfigError(f"--{foreign[0]}={rest[foreign[0]]!r} is {where}, not of --task={task}; drop it"
                          + (f" or use --task={owners[0]}" if owners else ""))
    ts = settings_cls(**{k: v for k, v in rest.items() if k in own}) if settings_cls else None
    return TrainConfig(**run, privacy=privacy, task_settings=ts)


def task_settings_class(task: str):
    import tasks

    return tasks.settings_class(task) if task in tasks.REGISTRY else None


def all_task_settings() -> dict[str, type]:
    import tasks

    return {name: tasks.settings_class(name) for name in tasks.REGISTRY}


def from_json(path: str) -> TrainConfig:
    with open(path) as f:
        d = json.load(f)
    return make(strict=False, **d.get("config", d))


def field_types(config_cls) -> dict[str, type]:
    """Each field's value type (Optional[X] -> X)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: ([a for a in typing.get_args(hints[f.name]) if a is not type(None)][0]
                     if typing.get_origin(hints[f.name]) is typing.Union else hints[f.name])
            for f in dataclasses.fields(config_cls)}


def flag_table() -> dict[str, tuple[dataclasses.Field, type, str]]:
    """Every flag of scripts/train.py: name -> (field, value type, part: 'run', 'privacy' or 'task'). A name that
    several tasks have (the model shape) is one flag; they must agree on its type and default."""
    out: dict[str, tuple[dataclasses.Field, type, str]] = {}
    parts = [(TrainConfig, "run"), (PrivacySettings, "privacy")] + [(c, "task") for c in all_task_settings().values()]
    for cls, part in parts:
        types = field_types(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("privacy", "task_settings"):
                continue
            if f.name in out:
                g, t, p = out[f.name]
                if (p, t, g.default) != (part, types[f.name], f.default):
                    raise TypeError(f"setting {f.name} of {cls.__name__} clashes with another part's {f.name}")
                continue
            out[f.name] = (f, types[f.name], part)
    return out


def read_flagfile(path: str) -> dict[str, Any]:
    """The settings of an absl flagfile (``--name=value`` lines), typed; unknown names are refused."""
    table = flag_table()
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("--") or "=" not in line:
                continue
            k, v = line[2:].split("=", 1)
            need(k in table, f"{path}: --{k} is not a setting; see scripts/train.py --help")
            t = table[k][1]
            out[k] = (v.lower() in ("1", "true")) if t is bool else t(v)
    return out
