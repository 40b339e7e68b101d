"""The HTML privacy report: the released page and the operator copy of a real run, rendered in headless
Chromium (Debian's chromium package; `make browser` installs it), and the renderer on a synthetic run
directory (what stays out of the released page, escaping, stale operator files)."""

import base64
import dataclasses
import html as html_lib
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import load_json

BANNER = "operator-only: computed from clients' data without noise; do not release"
OPERATOR_IDS = ("operator-only", "operator-banner", "training-curves", "training-curves-img", "heldout", "audit",
                "frontier", "frontier-img")


def chromium() -> str:
    """The chromium executable; the test fails (it does not skip) when there is none."""
    path = shutil.which("chromium")
    if not path:
        pytest.fail("chromium is not installed: `make browser` installs it (Debian's chromium package; "
                    "apt-get install -y chromium)", pytrace=False)
    return path


def run_chromium(page, tmp_path, *args):
    """Headless Chromium on file://page, offline (every host name fails to resolve), with a throwaway
    profile; checks it exits 0 and logs no script error or failed load. Returns the CompletedProcess."""
    profile = tmp_path / f"profile-{len(os.listdir(tmp_path))}"
    p = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        "--enable-logging=stderr", "--v=0", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--host-resolver-rules=MAP * ~NOTFOUND", *args,
                        "file://" + os.path.abspath(page)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for bad in ("Uncaught", "Failed to load resource"):
        assert bad not in p.stderr, [line for line in p.stderr.splitlines() if bad in line]
    return p


def pages(run_dir):
    released = os.path.join(run_dir, "privacy_report.html")
    operator = os.path.join(run_dir, "operator", "privacy_report.html")
    for p in (released, operator):
        assert os.path.isfile(p), f"{p} was not written"
    return released, operator


def ids(html):
    return set(re.findall(r'\bid="([^"]+)"', html))


def check_self_contained(html):
    """No script, no reference outside the page: every src/href is a data: URI or an in-page anchor."""
    assert "<script" not in html.lower()
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html, flags=re.I)
    assert not [r for r in refs if "http://" in r or "https://" in r]
    assert all(r.startswith(("data:", "#")) for r in refs), [r[:80] for r in refs if not r.startswith("data:")]
    for mime, data in re.findall(r'src="data:([^;]+);base64,([^"]+)"', html):
        raw = base64.b64decode(data, validate=True)
        assert mime in ("image/png", "image/svg+xml"), mime
        assert raw.startswith(b"\x89PNG\r\n\x1a\n") if mime == "image/png" else (b"<svg" in raw[:2000])
    assert '<meta charset="utf-8">' in html and "@media print" in html


def test_pages_load_offline_and_state_the_reports_epsilon(trained_run, tmp_path):
    d = trained_run["dir"]
    r = load_json(os.path.join(d, "privacy_report.json"))
    curves = open(os.path.join(d, "operator", "training_curves.png"), "rb").read()
    released, operator = pages(d)
    doms = {}
    for page in (released, operator):
        check_self_contained(open(page, encoding="utf-8").read())
        dom = doms[page] = run_chromium(page, tmp_path, "--dump-dom").stdout
        cell = re.search(r'<td id="epsilon">([^<]*)</td>', dom)
        assert cell, dom[:2000]
        assert cell.group(1) == f"{r['epsilon']:.4f}" and float(cell.group(1)) == round(r["epsilon"], 4)
        assert re.search(r'<img id="epsilon-plot" src="data:image/svg\+xml;base64,', dom)  # from the ledger
        assert r["statement"].split(":")[0] in dom
    # The released page shows nothing computed from the clients' data without noise.
    dom = doms[released]
    assert not ids(dom) & set(OPERATOR_IDS) and BANNER not in dom
    assert base64.b64encode(curves).decode()[:200] not in dom and "data:image/png" not in dom
    # The operator copy: the banner and the training curves inline, byte for byte.
    dom = doms[operator]
    assert {"operator-banner", "operator-only", "training-curves-img"} <= ids(dom) and BANNER in dom
    img = re.search(r'<img id="training-curves-img" src="data:image/png;base64,([^"]+)"', dom)
    assert img and base64.b64decode(img.group(1)) == curves


def test_screenshots_are_not_blank(trained_run, tmp_path):
    from PIL import Image

    for page in pages(trained_run["dir"]):
        shot = tmp_path / (os.path.basename(os.path.dirname(page)) + ".png")
        run_chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars")
        assert shot.stat().st_size > 20_000
        im = np.asarray(Image.open(shot).convert("RGB"))
        assert im.shape == (2000, 1200, 3)
        colours = np.unique((im[..., 0].astype(np.uint32) << 16) | (im[..., 1].astype(np.uint32) << 8) | im[..., 2])
        assert len(colours) > 50 and im.min() < 64 and im.max() > 200  # text on a light page, not one colour


def test_the_error_check_sees_a_script_error(tmp_path):
    """The stderr check above is not vacuous: Chromium logs an uncaught exception there."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><meta charset="utf-8"><p>x</p><script>no_such_name.f();</script>')
    with pytest.raises(AssertionError, match="Uncaught"):
        run_chromium(page, tmp_path, "--dump-dom")


# --- the renderer alone, on a synthetic run directory (no training, no browser) ----------------------------------


def synthetic_run(base, audit_epsilon=None):
    """A run directory inside a frontier's directory, with the files write_pages reads: config.json and
    ledger.jsonl (released), operator/{training_curves.png,summary.json,audit.json}, and the frontier's
    frontier.png and frontier.json beside it."""
    from tff_pipeline import frontier, report
    from tff_pipeline.io import save_figure
    from tff_pipeline.mechanisms import REGISTRY

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mech = REGISTRY["dp_fedavg"](population=1139, clients_per_round=8, noise_multiplier=0.7, delta=1e-5,
                                 sampling="poisson")
    run = base / "eps-3-seed-0"
    (run / "operator").mkdir(parents=True)
    entries = [{"round": i + 1, "attempt": 0, **e} for i, e in enumerate(mech.planned_entries(5))]
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (run / "config.json").write_text(json.dumps({"mechanism": mech.name, "privacy": dataclasses.asdict(mech)}))
    releases = {"covered": ["saved_model/: the model"], "public": "Population sizes are treated as public.",
                "not_covered": ["operator/summary.json: held-out <metrics> & more"], "not_counted": ["tuning"]}
    r = report.build(mech, rounds_run=5, rounds_planned=5, entries=entries, unit="one <user>",
                     stop_reason="completed all planned rounds", releases=releases)
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0.1, 0.2, 0.15])
    save_figure(fig, str(run / "operator" / "training_curves.png"))
    (run / "operator" / "summary.json").write_text(json.dumps({
        "epsilon": r["epsilon"], "headline_metric": "test_top1_accuracy",
        "eval": {"test_top1_accuracy": 0.123456, "test_token_loss": 5.5},
        "public_pretraining": {"eval": {"test_top1_accuracy": 0.1, "test_token_loss": 6.0}},
        "baselines": {"baselines_this_split": {"bigram_top1": 0.105}}, "eval_by_client": {}}))
    (run / "operator" / "audit.json").write_text(json.dumps({
        "accountant_epsilon": r["epsilon"] if audit_epsilon is None else audit_epsilon, "delta": 1e-5,
        "membership_inference": {"attack": "<script>alert(1)</script>", "members": 13, "non_members": 68,
                                 "auc": 0.654321, "advantage": 0.2, "epsilon_lower_bound": 0.5, "confidence": 0.95},
        "members_are": "training clients", "non_members_are": "unseen clients", "consistent_with_accountant": True,
        "canaries": [{"text": "my pin is 1234", "clients": [1, 2, 3], "rank": 2, "references": 5000,
                      "exposure_rank": 11.3, "exposure_extrapolated": 14.2, "max_exposure": 40.0}],
        "canary_exposure_mean": 14.2, "canary_exposure_rank_mean": 11.3}))
    rows = [{"target_epsilon": 3.0, "seed": 0, "epsilon_rdp": 2.99, "epsilon_pld": 2.0, "noise_multiplier": 0.7,
             "rounds": 5, "clients_per_round": 8, "test_top1_accuracy": 0.0987654, "wall_s": 60.0,
             "public_only": {}, "baselines": {}}]
    frontier.write(str(base), rows, frontier.summarise(rows, ["test_top1_accuracy"]), {},
                   "test_top1_accuracy", ["test_top1_accuracy"], {"task": "keyboard", "seeds": 1})
    return run, r, mech


def test_operator_values_stay_out_of_the_released_page(tmp_path):
    from tff_pipeline import html_report

    run, r, mech = synthetic_run(tmp_path)
    released, operator = html_report.write_pages(str(run), r)
    assert (released, operator) == (str(run / "privacy_report.html"), str(run / "operator" / "privacy_report.html"))
    rel, op = open(released, encoding="utf-8").read(), open(operator, encoding="utf-8").read()
    for html in (rel, op):
        check_self_contained(html)
        assert f'<td id="epsilon">{r["epsilon"]:.4f}</td>' in html
        assert "one &lt;user&gt;" in html and "held-out &lt;metrics&gt; &amp; more" in html  # escaped
    # Everything computed from the data without noise is in the operator copy only.
    secrets = ("0.1235", "0.6543", "my pin is 1234", "0.09877", "14.20", "data:image/png")
    banner = html_lib.escape(BANNER)  # as the file holds it (the DOM above holds it unescaped)
    assert not [s for s in secrets if s in rel] and not ids(rel) & set(OPERATOR_IDS) and banner not in rel
    assert all(s in op for s in secrets) and set(OPERATOR_IDS) <= ids(op) and banner in op
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in op and "<script>" not in op
    # ε over rounds, from the ledger: the composition of its first k lines, ending at the report's ε.
    curve = html_report.epsilon_curve(str(run), r)
    assert curve[0] == (0, 0.0) and [k for k, _ in curve] == [0, 1, 2, 3, 4, 5]
    assert [e for _, e in curve[1:]] == pytest.approx([mech.epsilon(k)[0] for k in range(1, 6)], rel=1e-12)
    assert curve[-1][1] == pytest.approx(r["epsilon"], rel=1e-12)


def test_stale_operator_files_are_left_out(tmp_path):
    """An audit written for another ε (an earlier state of the run) is not shown as this report's."""
    from tff_pipeline import html_report

    run, r, _ = synthetic_run(tmp_path, audit_epsilon=1.5)
    _, operator = html_report.write_pages(str(run), r, frontier_dir=str(tmp_path / "nowhere"))
    op = open(operator, encoding="utf-8").read()
    assert "audit" not in ids(op) and "0.6543" not in op and "operator/audit.json was written for ε = 1.5000" in op
    assert "heldout" in ids(op) and "frontier" not in ids(op)  # an explicit frontier_dir without a frontier
