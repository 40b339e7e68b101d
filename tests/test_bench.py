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


def test_the_central_limit_trains_what_the_round_trains():
    """The limit's model has the round's trainable weights (--freeze_layers), and its step is plain SGD."""
    import numpy as np

    from tff_pipeline import bench, dp_fedavg

    w = bench.w1(population=4, clients_per_round=2)
    cfg = w.cfg.replace(freeze_layers="token_embedding,logits")
    model = bench._central_model(w.task, cfg)
    ours = dp_fedavg.build_keras_model(w.task, cfg.frozen_layers)
    assert [v.shape for v in model.trainable_variables] == [v.shape for v in ours.trainable_variables]
    assert not any(n.startswith(("token_embedding", "logits")) for n in (v.name for v in model.trainable_variables))
    x, y = w.task.client_dataset(0, 0).take(1).get_single_element()
    frozen = [v.numpy() for v in model.non_trainable_variables]
    before = [v.numpy() for v in model.trainable_variables]
    bench._central_step(model, w.task.loss(), 0.5)(x, y)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(frozen, model.non_trainable_variables))
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))
