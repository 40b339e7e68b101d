"""Bad input to scripts/train.py: one line on stderr that names the problem and
the fix, exit code 2, no traceback, and an earlier run left intact."""

import os

import pytest

from conftest import SMALL, call_train, run_script


def _one_line_error(p):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("flags, expected", [
    (["--noise_multiplier=-1"], "error: --noise_multiplier=-1.0 must be a finite number >= 0 (0 means no DP)"),
    (["--delta=1"], "error: --delta=1.0 must be in (0, 1)"),
    (["--target_epsilon=0"], "error: --target_epsilon=0.0 must be a finite number > 0"),
    (["--rounds=0"], "error: --rounds=0 must be at least 1"),
    (["--noise_multiplier=1", "--target_epsilon=3"], "error: give either --noise_multiplier or --target_epsilon"),
    (["--model_dim=30", "--heads=4"], "error: --model_dim=30 must be divisible by --heads=4"),
    (["stray"], "error: unexpected arguments: stray"),
    (["--workers=nohost"], "error: --workers: 'nohost' is not HOST:PORT; give e.g. --workers=10.0.0.5:8000"),
])
def test_invalid_flags(tmp_path, flags, expected):
    p = call_train(f"--output_dir={tmp_path / 'o'}", *flags)
    assert _one_line_error(p).startswith(expected)
    assert not os.path.exists(tmp_path / "o" / "config.json")


def test_a_real_process_exits_2_with_one_line(tmp_path):
    """The other cases call train.py's main in this process (cli.call); this one is the script itself."""
    p = run_script("train.py", f"--output_dir={tmp_path / 'o'}", "--task=weather", timeout=300)
    assert _one_line_error(p).startswith("error: --task='weather' is unknown; choose one of: keyboard")
    assert not os.path.exists(tmp_path / "o" / "config.json")


def test_existing_run_is_refused_and_left_intact(trained_run):
    d = trained_run["dir"]
    before = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if f != ".lock"}
    p = call_train(f"--output_dir={d}", "--rounds=1", *SMALL)
    line = _one_line_error(p)
    assert line.startswith(f"error: --output_dir={d} already holds a completed run of 3 rounds; choose a new "
                           f"--output_dir, pass --overwrite to replace it, or raise --rounds above 3")
    assert {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d) if f != ".lock"} == before


def test_foreign_files_in_the_output_dir_are_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    p = call_train(f"--output_dir={tmp_path / 'o'}")
    assert _one_line_error(p) == (f"error: --output_dir={tmp_path / 'o'} already holds files from an earlier run; "
                                  f"choose a new --output_dir or pass --overwrite to replace it")
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    p = call_train(f"--output_dir={f}")
    assert "is a file, not a directory" in _one_line_error(p)
    assert f.read_text() == "keep me"


def test_cohort_larger_than_population_names_the_limit(tmp_path):
    p = call_train(f"--output_dir={tmp_path / 'o'}", "--clients_per_round=5000", *SMALL)
    assert _one_line_error(p).startswith("error: --clients_per_round=5000 exceeds the population of 1139")


def test_noise_too_large_for_adaptive_clipping_says_which_flag(tmp_path):
    p = call_train(f"--output_dir={tmp_path / 'o'}", "--clients_per_round=5", "--noise_multiplier=2",
                   *SMALL)
    line = _one_line_error(p)
    assert "--noise_multiplier=2.0 is too large for adaptive clipping" in line and "--clipped_count_stddev" in line


def test_unknown_frozen_layer_lists_the_layers(tmp_path):
    p = run_script("train.py", f"--output_dir={tmp_path / 'o'}", "--freeze_layers=embedding", "--rounds=1",
                   "--clients_per_round=2", "--noise_multiplier=0", *SMALL, timeout=300)
    line = _one_line_error(p)
    assert "has no layer 'embedding'" in line and "token_embedding" in line
