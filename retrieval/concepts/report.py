"""The concepts report: TCAV scores against the random runs' spread, example images,
and one plain sentence per finding. Used on its own (`casebase concepts --out`) and
as a section of the audit report. Case images only; no patient ids or file paths."""

from __future__ import annotations

import base64
import html

import numpy as np
from matplotlib.figure import Figure

from retrieval.audit.report import CSS, _img, _n, _png

WHAT = {
    "classes": "the model's {c} score",
    "similarity": "similarity to the indexed {c} cases",
}


def _short(layer: str) -> str:
    return layer.replace("backbone.", "")


def findings(data: dict) -> list[dict]:
    """One finding per concept and target: significant classes, or none (at the headline layer)."""
    out = []
    for name, v in data.get("concepts", {}).items():
        for target in ("classes", "similarity"):
            tests = v.get(target) or {}
            sig = {c: t for c, t in tests.items() if t.get("significant")}
            if sig:
                for c, t in sig.items():
                    up = t.get("rises", t["tcav_score"] > t["random_mean"])
                    what = WHAT[target].format(c=c)
                    text = (
                        f"Along '{name}', {what} {'rises' if up else 'falls'} for "
                        f"{t['tcav_score']:.0%} of {c} cases (random image sets: "
                        f"{t['random_mean']:.0%} ± {t['random_std']:.0%}; corrected p = "
                        f"{t['p_value']:.2g}, layer {_short(v['layer'])}): "
                        + (f"{what} depends on {name}." if up else f"{name} counts against {c}.")
                    )
                    out.append(
                        {
                            "concept": name,
                            "target": target,
                            "class": c,
                            "significant": True,
                            "direction": "up" if up else "down",
                            "tcav_score": t["tcav_score"],
                            "p_value": t["p_value"],
                            "text": text,
                        }
                    )
            elif tests:
                pmin = min(t["p_value"] for t in tests.values())
                text = (
                    f"'{name}' has no significant effect on "
                    + ("any class score" if target == "classes" else "similarity to any class")
                    + f" (smallest corrected p = {pmin:.2g}, layer {_short(v['layer'])})."
                )
                out.append({"concept": name, "target": target, "significant": False, "text": text})
    return out


def fig_scores(name: str, v: dict) -> str | None:
    """Strip plot per class: the concept's runs (coloured) beside the random runs (grey)."""
    targets = [t for t in ("classes", "similarity") if v.get(t)]
    if not targets:
        return None
    fig = Figure(figsize=(4.2 * len(targets), 3.0), layout="constrained")
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, target in zip(axes, targets, strict=True):
        tests = v[target]
        for j, t in enumerate(tests.values()):
            for off, vals, col in (
                (-0.18, t.get("scores", []), "#c0392b" if t["significant"] else "#2e86c1"),
                (0.18, t.get("random_scores", []), "#95a5a6"),
            ):
                xs = j + off + rng.uniform(-0.07, 0.07, len(vals))
                ax.scatter(xs, vals, s=10, color=col, alpha=0.8)
                if len(vals):
                    ax.hlines(np.mean(vals), j + off - 0.12, j + off + 0.12, color="k", lw=1.5)
            if t["significant"]:
                ax.text(j, 1.04, "*", ha="center", fontsize=13, color="#c0392b")
        ax.set_xticks(range(len(tests)), list(tests), fontsize=8)
        ax.set_ylim(-0.05, 1.12)
        ax.axhline(0.5, color="#bbb", lw=0.8, ls=":")
        ax.set_ylabel("TCAV score")
        ax.set_title(
            f"{name}: {'class logit' if target == 'classes' else 'similarity to class'}",
            fontsize=9,
        )
    return _png(fig)


def _thumbs(paths: list[str]) -> str:
    from retrieval.data.imageio import read_image, to_uint8_rgb

    out = []
    for p in paths:
        try:
            rgb = to_uint8_rgb(read_image(p).pixels)
        except Exception:  # noqa: BLE001 - a thumbnail that cannot be drawn is left out
            continue
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).resize((96, 96)).save(buf, format="PNG")
        out.append(_img(base64.b64encode(buf.getvalue()).decode(), "example", ""))
    return "".join(out)


def _table(v: dict) -> str:
    rows = []
    for layer, lv in v.get("layers", {}).items():
        for target in ("classes", "similarity"):
            for c, t in (lv.get(target) or {}).items():
                cls = ' class="flag"' if t["significant"] else ""
                rows.append(
                    f"<tr><td class=l>{html.escape(_short(layer))}</td><td class=l>"
                    f"{'logit' if target == 'classes' else 'similarity'}</td><td class=l>"
                    f"{html.escape(c)}</td><td>{_n(t['tcav_score'], '.2f')}</td><td>"
                    f"{_n(t['random_mean'], '.2f')} ± {_n(t['random_std'], '.2f')}</td><td>"
                    f"{_n(t['p_value'], '.3g')}</td><td{cls}>{'yes' if t['significant'] else 'no'}"
                    f"</td><td>{_n(lv['cav_accuracy'], '.2f')}</td></tr>"
                )
    return (
        "<table><tr><th class=l>layer</th><th class=l>target</th><th class=l>class</th>"
        "<th>TCAV</th><th>random</th><th>p (corrected)</th><th>significant</th>"
        "<th>CAV acc.</th></tr>" + "".join(rows) + "</table>"
    )


def render_section(data: dict, examples: dict[str, list[str]] | None = None) -> str:
    """The concepts section (an <h2> and its content) for any report."""
    body = ["<h2>Concepts (TCAV)</h2>"]
    fs = data.get("findings") or findings(data)
    sig = [f for f in fs if f.get("significant")]
    box = "summary" if sig else "clean"
    body.append(f'<div class="{box}">' + "<br>".join(html.escape(f["text"]) for f in fs) + "</div>")
    for name, v in data.get("concepts", {}).items():
        body.append(
            f"<h3>{html.escape(name)}</h3><p class=muted>{v.get('n_images')} example images "
            f"({html.escape(str(v.get('kind')))}); headline layer {html.escape(_short(v['layer']))}, "
            f"CAV accuracy {_n(v.get('cav_accuracy'), '.2f')}; embedding-space direction accuracy "
            f"{_n(v.get('embedding_accuracy'), '.2f')}.</p>"
        )
        if examples and examples.get(name):
            body.append(f'<div class="ex">{_thumbs(examples[name])}</div>')
        fig = fig_scores(name, v)
        if fig:
            body.append(_img(fig, f"TCAV scores of {name}"))
        body.append(_table(v))
    body.append(
        f"<p class=muted>TCAV (Kim et al. 2018): share of a class's cases whose score rises along "
        f"the concept's direction, over {data.get('random_runs')} runs against random draws of "
        f"the data's images; grey: CAVs between two random draws. {html.escape(data.get('test', ''))}; "
        f"{html.escape(data.get('correction', ''))}. Class inputs: split "
        f"{html.escape(str(data.get('class_inputs_split')))}. The similarity target is the mean "
        "cosine similarity to the indexed cases of the class.</p>"
    )
    return "".join(body)


def render_html(data: dict, examples: dict[str, list[str]] | None = None) -> str:
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>casebase concepts</title>"
        f"<style>{CSS}</style></head><body><h1>casebase concept tests</h1>"
        f"{render_section(data, examples)}</body></html>"
    )
