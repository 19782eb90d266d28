"""REPORT.html: one self-contained file (inline CSS, figures as base64 PNG, no scripts,
no external links) from an audit result.

It holds case ids, labels and attribute values only: no patient ids (not even
hashed), names, dates or file paths.
"""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone

import numpy as np
from matplotlib.figure import Figure

from retrieval.audit import verdict
from retrieval.audit.examples import Example, Panel

FLAG = "#c0392b"
OK = "#2e86c1"
GREY = "#7f8c8d"
BIAS = "#e67e22"


def _color(attr: dict) -> str:
    return FLAG if attr.get("flagged") else BIAS if attr.get("retrieval_bias") else OK


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f4f6f7}
@media (max-width:1100px){table{font-size:.78em}th,td{padding:3px 4px}}
.tw{overflow-x:auto}
td.l,th.l{text-align:left}.flag{color:#c0392b;font-weight:bold}.ok{color:#1e8449}
.bias{color:#b9770e;font-weight:bold}.muted{color:#666;font-size:.9em}.fig{max-width:100%;height:auto;display:block;margin:8px 0}
.ex{display:flex;gap:10px;flex-wrap:wrap;margin:10px 0 22px 0;align-items:flex-start}
.panel{border:1px solid #ddd;padding:6px;font-size:.82em;width:200px}
.panel img{width:196px;height:auto;image-rendering:pixelated;display:block}
.q{border:2px solid #2e86c1}.summary{background:#fdf2e9;border-left:4px solid #e67e22;padding:8px 12px}
.clean{background:#eafaf1;border-left:4px solid #27ae60;padding:8px 12px}
"""


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, cls: str = "fig") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _n(x, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return format(x, fmt)


def _err(center, interval) -> list[float]:
    lo, hi = (interval or [None, None])[:2]
    if center is None or lo is None or hi is None:
        return [0.0, 0.0]
    return [max(0.0, center - lo), max(0.0, hi - center)]


# --------------------------------------------------------------------------- figures
def fig_concordance(attrs: dict[str, dict]) -> str | None:
    names = [n for n, v in attrs.items() if v.get("concordance") is not None]
    if not names:
        return None
    fig = Figure(figsize=(max(5.0, 1.3 * len(names) + 2) + 2.2, 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    obs = [attrs[n]["concordance"] for n in names]
    exp = [attrs[n]["expected"] for n in names]
    oerr = np.array([_err(attrs[n]["concordance"], attrs[n].get("interval")) for n in names]).T
    nerr = np.array([_err(attrs[n]["expected"], attrs[n].get("null_interval")) for n in names]).T
    colors = [_color(attrs[n]) for n in names]
    qexp = [(attrs[n].get("query_null") or {}).get("expected") or 0 for n in names]
    qerr = np.array(
        [
            _err(
                (attrs[n].get("query_null") or {}).get("expected"),
                (attrs[n].get("query_null") or {}).get("null_interval"),
            )
            for n in names
        ]
    ).T
    w = 0.26
    ax.bar(x - w, obs, w, yerr=oerr, color=colors, capsize=3, label="observed (95% bootstrap)")
    ax.bar(
        x,
        exp,
        w,
        yerr=nerr,
        color=GREY,
        alpha=0.6,
        capsize=3,
        label="expected: index-side null (95%)",
    )
    ax.bar(
        x + w,
        qexp,
        w,
        yerr=qerr,
        color="#a569bd",
        alpha=0.6,
        capsize=3,
        label="expected: query-side null (95%)",
    )
    for xi, n in zip(x, names, strict=True):
        lift = attrs[n].get("lift")
        ax.text(
            xi - w,
            (attrs[n]["interval"][1] or obs[xi]) + 0.02,
            f"×{_n(lift, '.2f')}",
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(x, names)
    ax.set_ylabel("share of top-5 neighbours\nsharing the query's value")
    ax.set_ylim(0, min(1.15, max(max(obs), max(exp), max(qexp)) + 0.25))
    # beside the axes: inside, it covered the tallest bar (the flagged one, often)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(
        "Attribute concordance of retrieval (red: flagged, orange: retrieval bias)", fontsize=10
    )
    return _png(fig)


def fig_probe(attrs: dict[str, dict]) -> str | None:
    names = [n for n, v in attrs.items() if v.get("probe_balanced_accuracy") is not None]
    if not names:
        return None
    fig = Figure(figsize=(max(5.0, 1.2 * len(names) + 2) + 2.2, 3.3), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    ba = [attrs[n]["probe_balanced_accuracy"] for n in names]
    ch = [attrs[n]["chance"] for n in names]
    ax.bar(
        x,
        ba,
        0.55,
        color=[_color(attrs[n]) for n in names],
        label="within-label probe (balanced accuracy)",
    )
    for xi, c in zip(x, ch, strict=True):
        ax.hlines(c, xi - 0.35, xi + 0.35, color="k", lw=2, label="chance" if xi == 0 else None)
        ax.hlines(
            c + verdict.MIN_PROBE_MARGIN,
            xi - 0.35,
            xi + 0.35,
            color="k",
            lw=1,
            ls="--",
            label=f"chance + {verdict.MIN_PROBE_MARGIN}" if xi == 0 else None,
        )
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("balanced accuracy")
    # beside the axes: inside, it covered the tallest bar (the flagged one, often)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Can the attribute be read off the embedding, within each label?", fontsize=10)
    return _png(fig)


def fig_groups(groups: dict[str, dict], overall: float | None) -> str | None:
    names = [n for n, g in groups.items() if g]
    if not names:
        return None
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, n in zip(axes, names, strict=False):
        g = groups[n]
        keys = [k for k, v in g.items() if v["n"] > 0]
        vals = [g[k]["precision_at_5"] for k in keys]
        err = np.array([_err(g[k]["precision_at_5"], g[k].get("interval")) for k in keys]).T
        ax.bar(range(len(keys)), vals, yerr=err if len(keys) else None, color=OK, capsize=3)
        if overall is not None:
            ax.axhline(overall, color="k", lw=1, ls="--")
        ax.set_xticks(range(len(keys)), [f"{k}\n(n={g[k]['n']})" for k in keys], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(n, fontsize=9)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("precision@5")
    fig.suptitle("Retrieval precision@5 per group (dashed: all queries)", fontsize=10)
    return _png(fig)


def fig_counterfactual(cf: dict) -> str | None:
    sim, masked = cf.get("similarity_in_lesion"), cf.get("masked_retrieval")
    if not sim or not masked:
        return None
    fig = Figure(figsize=(11, 3.4), layout="constrained")
    a1, a2, a3 = fig.subplots(1, 3)
    labels = ["query", "case"]
    share = [sim.get("query") or 0, sim.get("case") or 0]
    area = [sim.get("lesion_area_query") or 0, sim.get("lesion_area_case") or 0]
    x = np.arange(2)
    a1.bar(x - 0.18, share, 0.36, color=OK, label="similarity inside lesion")
    a1.bar(x + 0.18, area, 0.36, color=GREY, alpha=0.6, label="lesion share of image area")
    a1.set_xticks(x, labels)
    a1.set_ylim(0, 1)
    a1.legend(fontsize=7)
    a1.set_title("Where the positive similarity lies", fontsize=9)
    conds = ["original", "lesion_removed", "background_removed"]
    vals = [masked[c]["precision_at_5"] or 0 for c in conds]
    a2.bar(range(3), vals, color=[OK, FLAG, "#27ae60"])
    a2.axhline(masked["chance_precision_at_5"], color="k", ls="--", lw=1, label="chance")
    a2.set_xticks(range(3), ["original", "lesion\nremoved", "background\nremoved"], fontsize=8)
    a2.set_ylim(0, 1.05)
    a2.legend(fontsize=7)
    a2.set_title("precision@5 when masking", fontsize=9)
    attrs = list(masked["original"].get("attribute_concordance", {}))
    if attrs:
        w = 0.8 / 3
        for i, (c, col) in enumerate(zip(conds, [OK, FLAG, "#27ae60"], strict=True)):
            v = [masked[c]["attribute_concordance"].get(a) or 0 for a in attrs]
            a3.bar(np.arange(len(attrs)) + (i - 1) * w, v, w, color=col, label=c.replace("_", " "))
        a3.set_xticks(range(len(attrs)), attrs, fontsize=8)
        a3.set_ylim(0, 1.05)
        a3.legend(fontsize=7)
        a3.set_title("attribute concordance when masking", fontsize=9)
    else:
        a3.set_visible(False)
    return _png(fig)


# --------------------------------------------------------------------------- html
def _attr_table(attrs: dict[str, dict]) -> str:
    head = (
        "<tr><th class=l>attribute</th><th class=l>kind</th><th>concordance</th><th>expected</th>"
        "<th>lift</th><th>p</th><th>p (Holm)</th><th>lift (query null)</th><th>p (Holm, query null)</th>"
        "<th>probe bal. acc.</th><th>chance</th>"
        "<th>label assoc. (V)</th><th class=l>flagged</th>"
        "<th>weakest lift it can flag (index/query)</th></tr>"
    )
    rows = []
    for n, v in attrs.items():
        qn = v.get("query_null") or {}
        flag = (
            '<span class="flag">FLAGGED (shortcut)</span>'
            if v["flagged"]
            else '<span class="bias">retrieval bias</span>'
            if v.get("retrieval_bias")
            else '<span class="ok">no</span>'
        )
        rows.append(
            f"<tr><td class=l>{html.escape(n)}</td><td class=l>{html.escape(v['kind'])}</td>"
            f"<td>{_n(v['concordance'])}</td><td>{_n(v['expected'])}</td><td>{_n(v['lift'], '.2f')}</td>"
            f"<td>{_n(v['p_value'], '.4f')}</td><td>{_n(v['p_value_holm'], '.4f')}</td>"
            f"<td>{_n(qn.get('lift'), '.2f')}</td><td>{_n(qn.get('p_value_holm'), '.4f')}</td>"
            f"<td>{_n(v['probe_balanced_accuracy'])}</td><td>{_n(v['chance'])}</td>"
            f"<td>{_n(v.get('label_association'), '.2f')}</td><td class=l>{flag}</td>"
            f"<td>{_n(v.get('detectable_lift'), '.2f')}/{_n(qn.get('detectable_lift'), '.2f')}</td></tr>"
        )
    return f"<div class=tw><table>{head}{''.join(rows)}</table></div>"  # scrolls if too narrow


def _groups_table(groups: dict[str, dict]) -> str:
    rows = []
    for a, g in groups.items():
        for k, v in g.items():
            rows.append(
                f"<tr><td class=l>{html.escape(a)}</td><td class=l>{html.escape(k)}</td>"
                f"<td>{v['n']}</td><td>{_n(v['precision_at_5'])}</td></tr>"
            )
    return (
        "<table><tr><th class=l>attribute</th><th class=l>group</th><th>n</th><th>precision@5</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _uncertainty_section(data: dict) -> str:
    """Calibration (reliability diagram) and the classifier's prediction-set coverage."""
    cal, ps = data.get("calibration") or {}, data.get("prediction_sets") or {}
    if not cal and not ps:
        return ""
    from retrieval.service.uncertainty import reliability_plot

    out = ["<h2>Uncertainty</h2>"]
    if ps.get("coverage") is not None:
        lo, hi = ps["coverage_ci95"]
        out.append(
            f"<p>{ps['target_coverage']:.0%} prediction sets (calibrated on "
            f"{html.escape(str(ps.get('calibrated_on')))}): coverage {ps['coverage']:.3f} "
            f"(95% CI {lo:.3f}–{hi:.3f}), mean size {ps['mean_size']:.2f}.</p>"
        )
    else:
        out.append(f"<p class=muted>{html.escape(str(ps.get('note', 'no prediction sets')))}</p>")
    if cal.get("ece_after") is not None:
        out.append(
            f"<p>Expected calibration error {cal['ece_before']:.3f} before and "
            f"{cal['ece_after']:.3f} after temperature scaling (T = {cal['temperature']:.2f}).</p>"
            + (f"<p class=muted>{html.escape(cal['ece_note'])}</p>" if cal.get("ece_note") else "")
        )
    png = reliability_plot(cal, "reliability diagram")
    if png:
        out.append(_img(base64.b64encode(png).decode("ascii"), "reliability diagram"))
    return "".join(out)


def _cf_section(cf: dict) -> str:
    if not cf.get("n_queries"):
        return f"<p class=muted>{html.escape(cf.get('note', 'not run'))}</p>"
    sim, masked = cf["similarity_in_lesion"], cf["masked_retrieval"]
    parts = [
        f"<p>{html.escape(cf.get('interpretation', ''))}</p>",
        f"<p class=muted>{cf['n_queries']} queries with lesion masks (at most {cf['max_queries']}, "
        f"of {cf['n_with_mask']} in the split), top-{cf['k']} neighbours each.</p>",
    ]
    fig = fig_counterfactual(cf)
    if fig:
        parts.append(_img(fig, "counterfactual"))
    parts.append(
        "<table><tr><th class=l>measure</th><th>value</th></tr>"
        f"<tr><td class=l>similarity inside the query's lesion</td><td>{_n(sim['query'])}</td></tr>"
        f"<tr><td class=l>lesion share of the query image</td><td>{_n(sim['lesion_area_query'])}</td></tr>"
        f"<tr><td class=l>similarity inside the neighbour's lesion</td><td>{_n(sim['case'])}</td></tr>"
        f"<tr><td class=l>lesion share of the neighbour image</td><td>{_n(sim['lesion_area_case'])}</td></tr>"
        f"<tr><td class=l>precision@5 original</td><td>{_n(masked['original']['precision_at_5'])}</td></tr>"
        f"<tr><td class=l>precision@5 lesion removed</td><td>{_n(masked['lesion_removed']['precision_at_5'])}</td></tr>"
        f"<tr><td class=l>precision@5 background removed</td>"
        f"<td>{_n(masked['background_removed']['precision_at_5'])}</td></tr>"
        f"<tr><td class=l>chance precision@5</td><td>{_n(masked['chance_precision_at_5'])}</td></tr></table>"
    )
    return "".join(parts)


LEAK_SEARCH_NOTE = "(leakage check: searched without the exclusion, on purpose)"


def exclusion_note(data: dict) -> str:
    """Whether the query's own patient was kept out of its neighbours (all but the leakage check)."""
    n, nq = data.get("queries_with_patient_id"), data.get("n_queries")
    if n is None or n == nq:
        return "the query's own patient excluded"
    if n == 0:
        return "own patient not excluded: the split has no patient ids"
    return f"the query's own patient excluded for the {n} of {nq} queries with a patient id"


def _leak_section(lk: dict) -> str:
    def ids(items, n=20):
        if not items:
            return ""
        cells = ", ".join(html.escape(f"{d['query_case']} ↔ {d['index_case']}") for d in items[:n])
        more = f" … ({len(items) - n} more)" if len(items) > n else ""
        return f"<br><span class=muted>{cells}{more}</span>"

    nd, own = lk["near_duplicates"], lk["own_patient_neighbors"]
    px = lk.get("identical_pixels")
    rows = [
        f"<tr><td class=l>embedding near-duplicates (cosine ≥ {nd['threshold']:.6g})</td>"
        f"<td>{nd['n']}{ids(nd['pairs'])}</td></tr>"
    ]
    npx = lk.get("near_duplicate_pixels")
    if npx is not None:
        rows.append(
            f"<tr><td class=l>pixel near-duplicates (thumbnail correlation ≥ {npx['threshold']})</td>"
            f"<td>{npx['n']}{ids(npx['pairs'])}</td></tr>"
        )
    if px is not None:
        rows.append(
            f"<tr><td class=l>identical pixels</td><td>{px['n']}{ids(px['pairs'])}</td></tr>"
        )
    rows.append(
        f"<tr><td class=l>case ids in both the split and the index</td><td>{lk['shared_case_ids']['n']}</td></tr>"
    )
    rows.append(
        "<tr><td class=l>top-5 neighbours from the query's own patient, searched without the "
        "exclusion (every other section excludes them)</td>"
        f"<td>{own['n']} in {own['n_queries_affected']} queries{ids(own['pairs'])}</td></tr>"
    )
    isp = lk.get("index_same_patient")
    if isp:
        rows.append(
            f"<tr><td class=l>indexed cases: top-5 neighbours from the same patient</td>"
            f"<td>{_n(isp['share_at_5'])} (random: {_n(isp['expected'])}, lift "
            f"{_n(isp['lift'], '.1f')})</td></tr>"
        )
    return (
        "<table><tr><th class=l>check</th><th class=l>count</th></tr>" + "".join(rows) + "</table>"
    )


def _sim(p) -> str:
    """The score the app shows (raw cosines of one class all read about 1.000), cosine after."""
    if p.score is None:
        return f"cosine {_n(p.similarity)}"
    return f"score {_n(p.score, '.2f')}, cosine {_n(p.similarity)}"


def _slice(p: Panel) -> str:
    """A volume panel's slice line ('<br>axial slice 4 of 0–7'); '' for a 2-D image."""
    return f"<br>axial {html.escape(p.slice)}" if getattr(p, "slice", None) else ""


def _examples_section(examples: list[Example]) -> str:
    if not examples:
        return "<p class=muted>No query had neighbours sharing its attribute value but not its label.</p>"
    a = html.escape(examples[0].attribute)
    out = [
        f"<p>Queries whose top-5 neighbours share their <b>{a}</b> but not their label. Boxes: the "
        "matched regions of the similarity decomposition (green: strongest pair); heat: where the "
        "similarity comes from.</p>"
    ]
    for ex in examples:
        q = ex.query
        panels = [
            f'<div class="panel q">{_img(base64.b64encode(q.png).decode(), q.case_id, "")}'
            f"<b>query {html.escape(q.case_id)}</b><br>label {html.escape(q.label)}<br>"
            f"{a} {html.escape(q.value)}{_slice(q)}</div>"
        ]
        for p in ex.neighbors:
            panels.append(
                f'<div class="panel">{_img(base64.b64encode(p.png).decode(), p.case_id, "")}'
                f"<b>{html.escape(p.case_id)}</b> ({_sim(p)})<br>label {html.escape(p.label)}<br>"
                f"{a} {html.escape(p.value)}<br>top pair carries {_n(p.contribution and 100 * p.contribution, '.0f')}%"
                f"{_slice(p)}</div>"
            )
        out.append(f'<div class="ex">{"".join(panels)}</div>')
    return "".join(out)


def render_html(
    data: dict, examples: list[Example] | None = None, concept_examples: dict | None = None
) -> str:
    attrs = data.get("attributes", {})
    flagged = data.get("flagged", [])
    if flagged:
        summary = (
            f'<div class="summary"><b>Flagged as retrieval shortcuts: {html.escape(", ".join(flagged))}.</b> '
            "Neighbours share these attributes more than their labels explain, and the embedding "
            "encodes them within each label.</div>"
        )
    else:
        summary = '<div class="clean"><b>No attribute flagged as a shortcut.</b></div>'
    bias = data.get("retrieval_bias", [])
    if bias:
        summary += (
            f'<div class="summary"><b>Retrieval bias: {html.escape(", ".join(bias))}.</b> Neighbours '
            "cluster by these attributes beyond their labels and the embedding encodes them, but "
            "they are not associated with the label in the index (see the per-group precision).</div>"
        )
    if note := verdict.sensitivity_note(data):
        summary += f"<p class=muted>{html.escape(note)}</p>"
    for f in data.get("concept_shortcuts") or []:  # TCAV evidence (retrieval/concepts/audit.py)
        summary += f'<div class="summary"><b>Concept shortcut:</b> {html.escape(f["text"])}</div>'
    for f in data.get("concept_influences") or []:  # significant, the class's score falling
        summary += f'<div class="summary"><b>Concept influence:</b> {html.escape(f["text"])}</div>'
    skipped = data.get("skipped_attributes") or {}
    skipped_html = (
        (
            "<p class=muted>Not audited: "
            + "; ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in skipped.items())
            + "</p>"
        )
        if skipped
        else ""
    )
    binned = [
        f"{html.escape(n)}: {html.escape(v['binning'])}"
        for n, v in attrs.items()
        if v.get("binning")
    ]
    figs = [(fig_concordance(attrs), "concordance"), (fig_probe(attrs), "probe")]
    gfig = fig_groups(data.get("groups", {}), data.get("precision_at_5"))
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "<h1>casebase retrieval audit</h1>",
        f"<p class=muted>{data.get('n_queries')} {html.escape(str(data.get('split')))} queries against "
        f"{data.get('n_indexed')} indexed cases ({html.escape(str(data.get('weighting')))} weighting), top-"
        f"{data.get('k')} neighbours, {html.escape(exclusion_note(data))} (the leakage check "
        f"searches without the exclusion, on purpose); {data.get('permutations')} "
        f"permutations, seed {data.get('seed')}; overall precision@5 {_n(data.get('precision_at_5'))}. "
        f"Generated {when}.</p>",
        summary,
        "<h2>Attributes</h2>",
        _attr_table(attrs),
        skipped_html,
        f"<p class=muted>Rule: {html.escape(data.get('flag_rule', ''))}.</p>",
    ]
    body += [_img(f, alt) for f, alt in figs if f]
    if binned:
        body.append("<p class=muted>Binning: " + "<br>".join(binned) + "</p>")
    body += [
        _concepts_section(data, concept_examples),
        "<h2>Per-group retrieval quality</h2>",
        _img(gfig, "groups") if gfig else "",
        _groups_table(data.get("groups", {})),
        _uncertainty_section(data),
        "<h2>Lesion or context? (counterfactual)</h2>",
        _cf_section(data.get("counterfactual", {})),
        "<h2>Leakage</h2>",
        _leak_section(data.get("leakage", {})) if data.get("leakage") else "",
        "<h2>Worst examples</h2>",
        _examples_section(examples or []),
        "<h2>Method</h2>",
        METHOD_HTML,
    ]
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>casebase audit</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def _concepts_section(data: dict, concept_examples: dict | None) -> str:
    if not data.get("concepts"):
        return ""
    from retrieval.concepts.report import render_section

    return render_section(data["concepts"], concept_examples)


METHOD_HTML = """
<p class=muted><b>Concordance</b>: share of each query's top-5 neighbours with the query's attribute value,
averaged over queries. <b>Expected</b>: the same under a null that keeps every indexed case's label and
every neighbour list fixed and permutes the attribute among indexed cases of the same label, so that
retrieval by label is never counted as a shortcut (exact expectation; p-value from the permutations,
Holm-corrected over attributes). The <b>query-side null</b> permutes the queries' values
among queries of the same label instead: it also catches a shortcut that works as a label proxy, pulling
neighbours towards the class an attribute stands for (intervals: bootstrap over query patients for the observed value, the
central 95% of the null for the expected one). <b>Probe</b>: logistic regression from the indexed
embeddings to the attribute, fitted and cross-validated (folds grouped by patient) within each label,
balanced accuracy averaged over labels; chance is 1/number of groups. <b>Counterfactual</b>: positive
terms of the exact similarity decomposition inside the lesion mask on the model's feature grid; queries
searched again with the lesion filled by blurred surrounding background, or with everything but the
lesion replaced by its mean. <b>Leakage</b>: embedding near-duplicates, identical decoded pixels,
shared case ids and own-patient neighbours between the split and the index.
Only case ids appear in this report.</p>
<p class=muted><b>How far a verdict goes.</b> The flag rule's cut-offs were chosen on grayscale
phantoms with a burned-in site marker. Scored on data they were not chosen on (RGB photo phantoms,
bench/audit_heldout.py in the repository, docs/results.md) they never flagged a label-free attribute
or a label-tied column the model could not see, and flagged the class-tied confounders that the
model was shown to use (a ruler, the camera device) in all runs but those of weakest use. Weak
use can go unflagged: "not flagged" is not proof that the model ignores an attribute; the
sentence under the verdicts says how large a lift this audit's queries could see. Look at
the probe and the counterfactual columns, and test a suspected artefact directly with
<code>--concept</code>.</p>
"""
