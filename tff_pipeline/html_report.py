"""The privacy report as one self-contained HTML page, in two copies.

``<run>/privacy_report.html`` is released: the statement, the report's
table, ε at other δ, ε over rounds (from ``ledger.jsonl``, which is
released), what the run directory holds and how to recompute ε. It holds
nothing computed from the clients' data without noise.

``<run>/operator/privacy_report.html`` is the operator's copy: the same page
plus, under a banner, what only the operator may see: the training curves
(held-out utility), the held-out summary, the audit results and the frontier.

Both pages need no network and no script: CSS inline, images as ``data:``
URIs, all text escaped; they print (``@media print``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from typing import Any, Optional

from tff_pipeline import report as report_mod
from tff_pipeline.io import atomic_write_text

PAGE = "privacy_report.html"
OPERATOR_DIR = "operator"  # tff_pipeline.rundir.OPERATOR_DIR (not imported: rundir pulls in the config)
BANNER = "operator-only: computed from clients' data without noise; do not release"
CURVE_POINTS = 60  # ε is evaluated after at most this many prefixes of the ledger (and after the last line)


def write_pages(run_dir: str, report: dict[str, Any], *, source_dir: Optional[str] = None,
                frontier_dir: Optional[str] = None) -> tuple[str, str]:
    """Writes ``run_dir``/privacy_report.html and ``run_dir``/operator/privacy_report.html; returns their paths.

    ``source_dir`` (default ``run_dir``): the run whose ledger, config and operator files to read.
    ``frontier_dir``: a frontier's output directory (frontier.png, frontier.json); by default the parent of
    ``source_dir`` when it holds frontier.png (a frontier point's run directory)."""
    src = source_dir or run_dir
    curve = epsilon_curve(src, report)
    released = os.path.join(run_dir, PAGE)
    atomic_write_text(released, render(report, curve=curve))
    op_dir = os.path.join(run_dir, OPERATOR_DIR)
    os.makedirs(op_dir, mode=0o700, exist_ok=True)
    operator = os.path.join(op_dir, PAGE)
    atomic_write_text(operator, render(report, curve=curve, operator=operator_material(src, report, frontier_dir)))
    return released, operator


# --- what the pages show ------------------------------------------------------------------------------------------


def epsilon_curve(run_dir: str, report: dict[str, Any]) -> Optional[list[tuple[int, float]]]:
    """ε (RDP) after each round result, from released data only: a plan's ``epsilon_curve``, or the
    composition of ``ledger.jsonl``'s first k lines by the mechanism in ``config.json``. None without DP, or
    when the ledger does not give the report's ε (then the page shows no curve rather than a wrong one)."""
    if not report.get("differentially_private") or report.get("epsilon") is None:
        return None
    if report.get("epsilon_curve"):
        return [(int(k), float(e)) for k, e in report["epsilon_curve"]]
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        entries = []
        with open(os.path.join(run_dir, "ledger.jsonl")) as f:
            for line in f:
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except ValueError:
                        entries.append({"round": None, "torn": True})  # as checkpoint.Ledger counts it
        from tff_pipeline.mechanisms import REGISTRY

        mech = REGISTRY[cfg["mechanism"]](**cfg["privacy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    n = len(entries)
    if not n:
        return None
    ks = sorted({max(1, round(i * n / CURVE_POINTS)) for i in range(1, CURVE_POINTS + 1)} | {n})
    curve = [(0, 0.0)] + [(k, mech.epsilon_of(mech.compose(entries[:k]))[0]) for k in ks]
    return curve if math.isclose(curve[-1][1], report["epsilon"], rel_tol=1e-9) else None


def operator_material(run_dir: str, report: dict[str, Any], frontier_dir: Optional[str] = None) -> dict[str, Any]:
    """What the operator copy adds, read from ``run_dir``/operator/ (and the frontier's directory): the
    training curves PNG, summary.json, audit.json, the frontier's plot and table. Files written for
    another ε than the report's (an earlier state of the run) are left out, with a note."""
    op = os.path.join(run_dir, OPERATOR_DIR)
    out: dict[str, Any] = {"notes": []}
    png = os.path.join(op, "training_curves.png")
    if os.path.isfile(png):
        out["training_curves"] = _read_bytes(png)
    for name in ("summary", "audit"):
        data = _read_json(os.path.join(op, f"{name}.json"))
        if data is None:
            continue
        eps = data.get("epsilon" if name == "summary" else "accountant_epsilon")
        if not _same(eps, report.get("epsilon")):
            out["notes"].append(f"operator/{name}.json was written for ε = {_num(eps)}, not this report's ε; "
                                f"it is not shown.")
            continue
        out[name] = data
    if frontier_dir is None:
        parent = os.path.dirname(os.path.abspath(run_dir))
        frontier_dir = parent if os.path.isfile(os.path.join(parent, "frontier.png")) else None
    if frontier_dir:
        f = {"png": _read_bytes(os.path.join(frontier_dir, "frontier.png")),
             "data": _read_json(os.path.join(frontier_dir, "frontier.json"))}
        if f["png"] or f["data"]:
            out["frontier"] = f
    return out


# --- rendering ----------------------------------------------------------------------------------------------------


def render(r: dict[str, Any], *, curve: Optional[list[tuple[int, float]]] = None,
           operator: Optional[dict[str, Any]] = None) -> str:
    """The page: released, or (``operator`` given, from ``operator_material``) the operator's copy."""
    title = "Privacy report" + (" (operator copy)" if operator is not None else "")
    body = []
    if operator is not None:
        body.append('<div class="banner" id="operator-banner">Operator copy: this page shows values computed from '
                    "clients' data without noise. Do not release it; the released page is "
                    f"../{PAGE}.</div>")
    plan = r.get("kind") == "plan"
    body.append(f"<h1>{_e(title)}</h1>")
    body.append(f'<p class="sub">{_e(r.get("kind", "training run"))} · {_e(r["mechanism"])} · '
                f'{_e(r["unit_of_privacy"])}</p>')
    body.append(_headline(r))
    body.append(_section("statement", "Statement", f'<p class="statement">{_e(r["statement"])}</p>'))
    body.append(_section("report-table", "The report", _kv_table(report_mod.report_rows(r))))
    if r.get("per_client"):
        body.append(_section("per-client", "Per client",
                             f"<p>ε above is {_e(r['epsilon_is'])}.</p>"
                             + _table(report_mod.PER_CLIENT_HEAD, report_mod.per_client_rows(r), numeric_from=1)))
    if r.get("epsilon_at_other_delta"):
        body.append(_section("other-delta", "ε at other δ",
                             _table(report_mod.OTHER_DELTA_HEAD, report_mod.other_delta_rows(r), numeric_from=0)))
    if curve:
        body.append(_section("epsilon-curve", "ε over rounds" + (" (planned)" if plan else ""), _curve_figure(r, curve)))
    if operator is not None:
        body.append(_operator_section(r, operator))
    if r.get("empirical_audit"):
        body.append(_section("audit-pointer", "Empirical audit", f"<p>With --audit: {_e(r['empirical_audit'])}.</p>"))
    body.append(_releases(r))
    body.append(_section("recompute", "Recompute it yourself",
                         f"<pre><code>{_e(report_mod.recompute_code(r))}</code></pre>"
                         "<p>Recorded DpEvent:</p>"
                         f'<pre><code id="recorded-event">{_e(json.dumps(r["recorded_event"], indent=2))}</code></pre>'))
    body.append('<footer>Written by tff_pipeline.html_report from privacy_report.json'
                + (" and ledger.jsonl" if curve and not plan else "") + ". Every ε is re-derivable with dp_accounting from the "
                "recorded DpEvent.</footer>")
    body_class = ' class="operator"' if operator is not None else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_e(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body{body_class}>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def _headline(r: dict[str, Any]) -> str:
    """The (ε, δ) in large type."""
    if not r["differentially_private"]:
        return '<p class="headline nodp">No differential privacy (noise multiplier 0): no (ε, δ) guarantee.</p>'
    eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.4f}"
    delta = f"{r['delta']:g}"
    return (f'<p class="headline">ε = <strong>{_e(eps)}</strong> at δ = {_e(delta)} '
            f'<span class="muted">(RDP accountant, {_e(r["unit_of_privacy"])})</span></p>')


def _curve_figure(r: dict[str, Any], curve: list[tuple[int, float]]) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 3.4))
    ax = fig.add_subplot()
    x, y = zip(*curve)
    ax.plot(x, y, color="#b22222", marker="o" if len(x) <= 30 else None, markersize=3)
    ax.set_xlabel("rounds" if r.get("kind") == "plan" else "round results accounted (privacy ledger lines)")
    ax.set_ylabel(f"ε (RDP) at δ = {r['delta']:g}")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg")
    what = ("the ε a run of this plan would have spent after each round" if r.get("kind") == "plan" else
            "ε after each line of the privacy ledger (ledger.jsonl, released), composed as the report composes it")
    return (f'<figure><img id="epsilon-plot" src="{_data_uri("image/svg+xml", buf.getvalue())}" '
            f'alt="ε over rounds"><figcaption>{_e(what)}; the last point is the report\'s ε.</figcaption></figure>')


def _operator_section(r: dict[str, Any], m: dict[str, Any]) -> str:
    parts = [f'<div class="banner">{_e(BANNER)}</div>']
    parts += [f'<p class="note">{_e(n)}</p>' for n in m.get("notes", ())]
    if m.get("training_curves"):
        parts.append('<h3 id="training-curves">Training curves: ε, clip norm, held-out utility</h3>'
                     f'<figure><img id="training-curves-img" src="{_data_uri("image/png", m["training_curves"])}" '
                     'alt="training curves: ε, adaptive clip norm and held-out metric over rounds">'
                     "<figcaption>operator/training_curves.png</figcaption></figure>")
    if m.get("summary"):
        parts.append(_heldout(m["summary"]))
    if m.get("audit"):
        parts.append(_audit(m["audit"], r))
    if m.get("frontier"):
        parts.append(_frontier(m["frontier"]))
    if len(parts) == 1 + len(m.get("notes", ())):
        parts.append("<p>No operator-only outputs were found beside this report.</p>")
    return f'<section id="operator-only" class="operator-only"><h2>Operator-only results</h2>{"".join(parts)}</section>'


def _heldout(s: dict[str, Any]) -> str:
    head = s.get("headline_metric")
    pre = ((s.get("public_pretraining") or {}).get("eval")) or {}
    rows = [(k + (" (headline)" if k == head else ""), _num(v), _num(pre.get(k)) if pre else "")
            for k, v in (s.get("eval") or {}).items() if isinstance(v, (int, float))]
    out = ['<h3 id="heldout">Held-out evaluation (operator/summary.json)</h3>',
           _table(("metric", "final model", "after public pre-training") if pre else ("metric", "final model"),
                  [row if pre else row[:2] for row in rows], numeric_from=1)]
    for name, base in (s.get("baselines") or {}).items():
        vals = [(k, _num(v)) for k, v in base.items() if isinstance(v, (int, float))]
        notes = [f"{k}: {v}" for k, v in base.items() if isinstance(v, str)]
        if vals:
            out.append(f"<p>{_e(name.replace('_', ' '))}" + (f" ({_e('; '.join(notes))})" if notes else "") + "</p>"
                       + _table(("baseline", "value"), vals, numeric_from=1))
    by_client = s.get("eval_by_client") or {}
    if by_client:
        cols = list(dict.fromkeys(k for row in by_client.values() for k in row))
        out.append("<p>Per client</p>" + _table(("client", *cols), [(name, *(_num(row.get(c)) for c in cols))
                                                                    for name, row in by_client.items()], numeric_from=1))
    timing = [(k.replace("_", " "), _num(s[k], "{:.1f}")) for k in ("seconds_total", "seconds_training", "seconds_per_round")
              if isinstance(s.get(k), (int, float))]
    if timing:
        out.append(f'<p class="muted">{_e(", ".join(f"{k} {v}" for k, v in timing))}</p>')
    return "".join(out)


def _audit(a: dict[str, Any], r: dict[str, Any]) -> str:
    mi = a["membership_inference"]
    acc = "∞ (no DP)" if a.get("accountant_epsilon") is None else f"{a['accountant_epsilon']:.4f}"
    rows = [("Attack", mi.get("attack", "")), ("Members", f"{mi['members']}: {a.get('members_are', '')}"),
            ("Non-members", f"{mi['non_members']}: {a.get('non_members_are', '')}"),
            ("Membership-inference AUC", f"{mi['auc']:.4f}"), ("Advantage max(TPR − FPR)", f"{mi['advantage']:.4f}"),
            (f"ε lower bound ({mi.get('confidence', 0.95):.0%} confidence)", f"{mi['epsilon_lower_bound']:.4f}"),
            ("Accountant ε", acc),
            ("Consistent with the accountant", "yes" if a.get("consistent_with_accountant") else
             "**NO**: the lower bound exceeds the accountant's ε")]
    if a.get("canaries"):
        rows += [("Canary exposure, mean (extrapolated)", f"{a['canary_exposure_mean']:.2f} bits"),
                 ("Canary exposure, mean (rank)", f"{a['canary_exposure_rank_mean']:.2f} bits")]
    out = ['<h3 id="audit">Empirical audit (operator/audit.json)</h3>', _kv_table(rows)]
    if a.get("canaries"):
        out.append("<p>Canaries</p>" + _table(
            ("canary", "clients", "rank", "references", "exposure (rank)", "exposure (extrapolated)", "at most"),
            [(c.get("text", ""), str(len(c.get("clients", ()))), str(c["rank"]), str(c["references"]),
              f"{c['exposure_rank']:.2f}", f"{c['exposure_extrapolated']:.2f}", f"{c['max_exposure']:.1f}")
             for c in a["canaries"]], numeric_from=1))
    return "".join(out)


def _frontier(f: dict[str, Any]) -> str:
    out = ['<h3 id="frontier">Privacy–utility frontier</h3>']
    if f.get("png"):
        out.append(f'<figure><img id="frontier-img" src="{_data_uri("image/png", f["png"])}" '
                   'alt="utility against ε over the frontier\'s runs"><figcaption>frontier.png</figcaption></figure>')
    d = f.get("data") or {}
    if d.get("summary"):
        from tff_pipeline import frontier

        first = d["summary"][0]
        metrics = [k for k in first if f"{k}_min" in first]
        head, rows = frontier.table(d["summary"], metrics)
        meta = d.get("meta") or {}
        out.append(f"<p>{_e(str(meta.get('task')))} ({_e(str(meta.get('date')))}, commit "
                   f"{_e(str(meta.get('commit')))}): mean over {_e(str(meta.get('seeds')))} seed(s), [min, max] "
                   f"beside each metric.</p>" + _table(head, rows, numeric_from=0))
    if d.get("lines"):
        out.append("<p>Reference lines: " + _e("; ".join(f"{k} {v:.4f}" for k, v in d["lines"].items())) + "</p>")
    return "".join(out)


def _releases(r: dict[str, Any]) -> str:
    rel = r.get("releases")
    if rel:
        return _section("releases", "What this run directory holds",
                        "<p>Covered by the guarantee:</p>" + _list(rel["covered"])
                        + f"<p>Public by assumption: {_e(rel['public'])}</p>"
                        + '<p class="warn"><strong>Not covered (operator-only: computed from private data without '
                          'noise; do not release):</strong></p>' + _list(rel["not_covered"])
                        + "<p>Not counted:</p>" + _list(rel["not_counted"]))
    if r.get("not_covered"):
        return _section("releases", "Not covered by the guarantee", _list(r["not_covered"]))
    return ""


# --- HTML helpers -------------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _md(x: Any) -> str:
    """Escaped text with the report's Markdown emphasis (**x**) as <strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _e(x))


def _section(id_: str, title: str, inner: str) -> str:
    return f'<section id="{id_}"><h2>{_e(title)}</h2>{inner}</section>'


def _kv_table(rows) -> str:
    """Two columns, label and value; the ε row's cell is <td id="epsilon">."""
    ids = {report_mod.EPSILON_LABEL: "epsilon", "δ": "delta"}
    cells = []
    for k, v in rows:
        id_ = f' id="{ids[k]}"' if k in ids else ""
        cells.append(f'<tr><th scope="row">{_md(k)}</th><td{id_}>{_md(v)}</td></tr>')
    return f'<table class="kv">{"".join(cells)}</table>'


def _table(head, rows, numeric_from: int = 1) -> str:
    th = "".join(f'<th scope="col">{_e(h).replace("_", "_<wbr>")}</th>' for h in head)  # metric names wrap at _
    num = ' class="num"'
    body = "".join("<tr>" + "".join(f"<td{num if i >= numeric_from else ''}>{_md(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="wide"><table class="grid"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _list(items) -> str:
    return "<ul>" + "".join(f"<li>{_md(x)}</li>" for x in items) + "</ul>"


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    return "n/a" if not isinstance(v, (int, float)) or isinstance(v, bool) else (
        "∞" if math.isinf(v) else fmt.format(v))


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def _read_bytes(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1d2125; font: 15px/1.5 -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, "Noto Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 32px 40px; background: #fff; min-height: 100vh; }
h1 { font-size: 28px; margin: 8px 0 2px; }
h2 { font-size: 20px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #dfe3e8; }
h3 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: #5b6570; margin: 0 0 12px; }
.muted { color: #5b6570; font-size: 13px; }
.headline { font-size: 20px; margin: 10px 0 6px; padding: 10px 14px; background: #eef4fb; border-left: 5px solid #2b6cb0; }
.headline.nodp { background: #fdecea; border-left-color: #b22222; }
.statement { margin: 0; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #c9cfd6; padding: 5px 9px; vertical-align: top; text-align: left; }
table.kv { width: 100%; }
table.kv th { width: 32%; background: #f3f5f7; font-weight: 600; }
table.grid thead th { background: #e9edf1; }
.wide { max-width: 100%; overflow-x: auto; }
table.grid tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td#epsilon { font-weight: 700; font-size: 16px; background: #eef4fb; }
figure { margin: 10px 0 16px; }
figure img { max-width: 100%; height: auto; border: 1px solid #dfe3e8; }
figcaption { color: #5b6570; font-size: 13px; margin-top: 4px; }
pre { background: #f6f8fa; border: 1px solid #dfe3e8; border-radius: 4px; padding: 10px 12px; overflow-x: auto;
  white-space: pre-wrap; word-break: break-word; }
code, pre { font: 13px/1.45 "DejaVu Sans Mono", Menlo, Consolas, "Liberation Mono", monospace; }
ul { padding-left: 22px; }
li { margin: 3px 0; }
.warn { color: #8a1c1c; }
.banner { background: #b22222; color: #fff; font-weight: 700; padding: 10px 14px; margin: 8px 0 14px;
  border-radius: 3px; }
.operator-only { border: 3px solid #b22222; padding: 4px 16px 10px; margin: 28px 0; }
.operator-only h2 { border-bottom-color: #f0c4c4; }
.note { background: #fff7e0; border: 1px solid #e8d28a; padding: 6px 10px; }
footer { margin-top: 32px; color: #5b6570; font-size: 12px; border-top: 1px solid #dfe3e8; padding-top: 8px; }
@media print {
  @page { margin: 14mm; }
  body { background: #fff; font-size: 11pt; }
  main { max-width: none; padding: 0; min-height: 0; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2, h3 { break-after: avoid; }
  table, figure, pre, .banner, .headline { break-inside: avoid; }
  pre { white-space: pre-wrap; }
  .wide { overflow: visible; }
  table.grid { font-size: 9pt; }
}
"""
