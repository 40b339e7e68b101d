"""DP-FTRL end to end on the keyboard task: a run stopped after 3 rounds and
resumed to 5. Its schedule takes a client at most once per tree, the resumed
run continues the epoch, and the report's ε is recomputed here from the
ledger's lines with dp_accounting alone."""

import collections
import json
import os

import pytest

import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from conftest import SMALL, call_train, load_json


@pytest.fixture(scope="module")
def ftrl_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ftrl") / "kb")
    # The 270 training users of a tuning run on 300 set-apart users (a small population: 5 rounds cost little).
    common = ["--task=keyboard", "--tuning_clients=300", "--tuning_run", f"--output_dir={out}",
              "--mechanism=dp_ftrl", "--clients_per_round=90",
              "--noise_multiplier=1.5", "--delta=1e-5", "--eval_every=5", "--checkpoint_every=1", "--seed=1",
              "--server_optimizer=sgdm", "--server_learning_rate=0.5", "--ftrl_clip=0.2", *SMALL]
    first = call_train("--rounds=2", *common)  # in this process: no TensorFlow import per run
    assert first.returncode == 0, first.stderr[-3000:]
    # Resumed after the tree's second step, when its noise buffer holds more rows than a fresh state's.
    second = call_train("--rounds=5", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first, second


def _lines(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def test_schedule_one_participation_per_tree_and_the_epoch_continues_on_resume(ftrl_run):
    out, first, second = ftrl_run
    assert "resuming" in second.stdout and "from the checkpoint of round 2" in second.stdout
    ledger = _lines(os.path.join(out, "ledger.jsonl"))
    # 270 clients in cohorts of 90: 3 rounds per epoch, one tree each.
    # The resumed run goes on with tree 0 (its epoch's order is in the checkpoint).
    assert [(e["round"], e["tree"]) for e in ledger] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)]
    rows = _lines(os.path.join(out, "operator", "participation.jsonl"))
    per_tree = collections.defaultdict(list)
    for e, row in zip(ledger, rows):
        assert len(row["clients"]) == 90
        per_tree[e["tree"]] += row["clients"]
    for ids in per_tree.values():
        assert len(ids) == len(set(ids))


def test_report_epsilon_is_the_composition_of_the_ledger(ftrl_run):
    out, _, _ = ftrl_run
    r = load_json(os.path.join(out, "privacy_report.json"))
    ledger = _lines(os.path.join(out, "ledger.jsonl"))
    z = load_json(os.path.join(out, "config.json"))["privacy"]["noise_multiplier"]
    sizes = list(collections.Counter(e["tree"] for e in ledger).values())
    event = dp_accounting.ComposedDpEvent([dp_accounting.SingleEpochTreeAggregationDpEvent(z, n) for n in sizes])
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL).compose(event)
    assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert r["mechanism_name"] == "dp_ftrl" and r["accountant_relation"] == "REPLACE_SPECIAL"
    assert r["tree_sizes"] == sizes == [3, 2] and r["rounds_accounted"] == 5 and r["rounds_run"] == 5
    assert r["zcdp_rho"] == pytest.approx((2 + 2) / (2 * z * z))  # depths ⌈log2(n+1)⌉: 2 and 2
    assert "checkpoints/" in " ".join(r["releases"]["not_covered"]) and "secret tree noise seed" in " ".join(
        r["releases"]["not_covered"])
    assert os.path.exists(os.path.join(out, "saved_model", "saved_model.pb"))
