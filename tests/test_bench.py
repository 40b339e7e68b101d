"""scripts/bench.py runs the three variants on the same rounds and writes its
table as JSON (speed itself is checked by `make bench`, never by tests)."""

import json

from conftest import run_script


def test_bench_w2_one_round_writes_json(tmp_path):
    """Central first: it used to fail ("Your Layer or Model is in an invalid state"); any order works."""
    out = tmp_path / "b.json"
    p = run_script("bench.py", "--workload=w2", "--rounds=1", "--variants=central,pipeline,central_tfdata", f"--output={out}",
                   timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    assert r["workload"] == "w2" and r["clients_per_round"] == 10 and list(r["variants"]) == ["central", "pipeline",
                                                                                          "central_tfdata"]
    for v in r["variants"].values():
        assert v["median_s_per_round"] > 0 and v["examples_per_s"] > 0 and len(v["s_per_round"]) == 1
    assert r["peak_rss_mb"] > 0
    assert r["variants"]["central"]["ratio_to_central"] == 1.0
    assert "w2        pipeline" in p.stdout


def test_bench_bad_variant_is_one_line(tmp_path):
    p = run_script("bench.py", "--variants=fast", timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == \
        "error: --variants='fast': choose from pipeline, per_client, tff_stock, central, central_tfdata"
