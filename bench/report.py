"""Results tables and figures in the docs, generated from bench/results/*.json.

    python -m bench.report            rewrite every generated block in the docs
    python -m bench.report --check    exit 1, naming the figure, when the docs and the JSON disagree

Why: every number the README or docs state must be re-derivable from a
benchmark's JSON, and a hand edit (or a stale figure after a re-run) must be
caught, not trusted. Two kinds of marker live in the Markdown files:

* a block, regenerated whole from one renderer in ``TABLES``::

      <!-- bench:query_latency -->
      ...generated table...
      <!-- /bench:query_latency -->

* an inline figure in prose, formatted from one JSON value::

      P@5 <!-- fig depth:phantoms.chest.precision_at_5 .2f -->0.98<!-- /fig -->

  The path is ``FILE:KEY.KEY.INDEX`` inside ``bench/results/FILE.json``; a
  list element may be picked by a field, ``results[size=100000]``. The format
  is a Python format spec, with ``%`` scaling a share to a percentage.

Renderers read only the JSON; each block ends with the machine, date and load
it was measured under, so a reader can judge the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]

BLOCK = re.compile(
    r"<!-- bench:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S
)
FIG = re.compile(
    r"<!-- fig (?P<path>[\w.-]+:[^ ]+)(?: (?P<fmt>[^ ]+))? -->(?P<text>.*?)<!-- /fig -->"
)
SELECT = re.compile(r"^(?P<key>[\w-]*)\[(?P<field>[\w-]+)=(?P<value>[^\]]+)\]$")


class ReportError(Exception):
    """A block or figure that cannot be generated (missing JSON, bad path)."""


# ---------------------------------------------------------------------------- JSON access


def load(name: str, results: Path = RESULTS) -> dict:
    path = results / f"{name}.json"
    if not path.is_file():
        raise ReportError(f"bench/results/{name}.json is missing (run bench/{name}.py)")
    return json.loads(path.read_text())


def lookup(doc, dotted: str):
    """`a.b[field=v].0.c` inside a JSON document; ReportError naming the step that failed."""
    cur = doc
    for step in dotted.split("."):
        m = SELECT.match(step)
        if m:
            if m["key"]:
                cur = _step(cur, m["key"], dotted)
            hits = [x for x in cur if str(x.get(m["field"])) == m["value"]]
            if len(hits) != 1:
                raise ReportError(f"{dotted}: {len(hits)} elements with {m['field']}={m['value']}")
            cur = hits[0]
        else:
            cur = _step(cur, step, dotted)
    return cur


def _step(cur, key: str, dotted: str):
    try:
        if isinstance(cur, list):
            return cur[int(key)]
        return cur[key]
    except (KeyError, IndexError, ValueError, TypeError):
        raise ReportError(f"{dotted}: no {key!r}") from None


def fmt(value, spec: str | None) -> str:
    if spec is None:
        return str(value)
    if spec.endswith("%"):
        return format(float(value) * 100, spec[:-1] + "f") + "%"
    return format(value, spec)


def machine_line(doc: dict) -> str:
    m = doc.get("machine", {})
    if m and all(isinstance(v, dict) for v in m.values()):  # one record per part run side by side
        m = next(iter(m.values()))
    cpu = m.get("cpu_model") or m.get("cpu") or "?"
    cores = m.get("cpus_usable") or m.get("cpu_count") or m.get("cores") or "?"
    gpu = m.get("cuda_device") or "no GPU"
    load = m.get("loadavg_start") or m.get("loadavg")
    end = m.get("loadavg_end")
    load_s = f"load {load[0]:.1f}" if load else "load not recorded"
    if load and end:
        load_s += f" → {end[0]:.1f}"
    date = str(doc["date"])[:10] if doc.get("date") else "(date not recorded)"
    torch_v = f", torch {m['torch'].split('+')[0]}" if m.get("torch") else ""
    return f"*Measured {date} on {cpu}, {cores} cores, {gpu}{torch_v}; {load_s}.*"


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- renderers


def _build_throughput(r: Path) -> str:
    d = load("build_throughput", r)
    mt, e2e = d["model_throughput"], d["end_to_end"]
    rows = [
        [
            name,
            f"{mt[name]['images_per_s']:.1f}",
            f"{mt[name]['images_per_s'] / mt['plain']['images_per_s']:.3f}",
        ]
        for name in ("plain", "saliency", "uniform")
    ]
    t1 = md_table(["embedding (pre-decoded batches)", "images/s", "vs plain forward"], rows)
    rows2 = [
        [k, f"{v['embed_images_per_s']:.1f}", f"{v['wall']['median']:.1f}", v["n_indexed"]]
        for k, v in e2e.items()
    ]
    t2 = md_table(["`index build` decoding", "images/s", "wall s (median)", "cases"], rows2)
    return f"{t1}\n\n{t2}\n\n{machine_line(d)}"


def _search_scale(name: str) -> Callable[[Path], str]:
    def render(r: Path) -> str:
        d = load(name, r)
        rows = []
        for x in d["results"]:
            knob = f"{x['knob']}={x['value']}" if x.get("knob") else ""
            rows.append(
                [
                    f"`{x['index']}`",
                    knob,
                    f"{x['recall_at_10']:.3f}",
                    f"{x['ms_per_query_batch1_1thread']:.2f}",
                    f"{x['speedup_vs_exact_batch1_1thread']:.0f}×",
                    f"{x['build_s']:.1f}",
                    f"{x['bytes_per_vector']:.0f}",
                ]
            )
        n = d["config"]["n"]
        head = f"{n:,} clustered {d['config']['dim']}-d unit vectors; batch-1 queries on 1 thread."
        t = md_table(
            ["index", "knob", "recall@10", "ms/query", "vs exact", "build s", "bytes/vector"], rows
        )
        return f"{head}\n\n{t}\n\n{machine_line(d)}"

    return render


def _query_latency(r: Path) -> str:
    d = load("query_latency", r)
    variants = list(d["results"][0]["variants"])
    rows = []
    for res in d["results"]:
        row = [f"{res['size']:,}", res["factory"]]
        row += [f"{res['variants'][v]['p50_ms']:.1f}" for v in variants]
        row.append(f"{res['peak_rss_mb']:.0f}")
        rows.append(row)
    t = md_table(["indexed", "factory", *[f"{v} p50 ms" for v in variants], "peak RSS MB"], rows)
    return f"`CaseRetriever.query`, k = {d['config']['k']}, {d['config']['queries']} queries per size.\n\n{t}\n\n{machine_line(d)}"


def _gradcam_vs_reference(r: Path) -> str:
    d = load("gradcam_vs_reference", r)
    rows = []
    for res in d["results"]:
        for b, v in res["batches"].items():
            pm = v["per_map"]
            # per_map holds seconds per call of a whole batch
            ours, ref = (pm[k]["median"] / int(b) for k in ("closed form", "pytorch-grad-cam"))
            rows.append(
                [
                    res["image_size"],
                    b,
                    f"{ours * 1000:.1f}",
                    f"{ref * 1000:.1f}",
                    f"{ours / ref:.2f}",
                ]
            )
    t = md_table(["px", "batch", "closed form ms/map", "pytorch-grad-cam ms/map", "ratio"], rows)
    return (
        f"{t}\n\nLargest difference from pytorch-grad-cam after the same normalisation: "
        f"{d['worst_max_abs_diff']:.1e} (target ≤ {d['targets']['max_abs_diff']:.0e}).\n\n{machine_line(d)}"
    )


def _explain_cost(r: Path) -> str:
    d = load("explain_cost", r)

    def sec(v):
        return "—" if v is None else f"{v:.3f}"

    rows = [
        [
            f"`{m}`",
            v.get("family", ""),
            sec(v.get("class_map_s")),
            sec(v.get("similarity_map_s")),
            f"{v['explain_s_median']:.3f}",
            v["image_forwards"],
            v["sample_counts"],
        ]
        for m, v in d["methods"].items()
    ]
    c = d["config"]
    t = md_table(
        [
            "method",
            "family",
            "s per class map",
            "s per similarity map",
            "s per query (k pairs)",
            "image forwards",
            "samples",
        ],
        rows,
    )
    model = "A seeded random-init" if c.get("random_init") else "The trained"
    return (
        f"{model} {c.get('backbone', '')} model at {c['image_size']} px. Per map: one "
        "query image's map for its predicted class, and for its similarity to one other "
        "image (the registry's attribute() alone, median of 3). Per query: "
        f"`query(k={c['k']}, explain=(method,))`'s explain time (the query's class map "
        f"and the neighbour pairs' maps), median of {c['images']} queries.\n\n"
        f"{t}\n\nAll methods: {d['all_methods_explain_s']:.1f} s.\n\n{machine_line(d)}"
    )


def _audit_seeds(r: Path) -> str:
    d = load("audit_seeds", r)
    rows = [[k, f"{v['held']}/{v['of']}"] for k, v in d["verdicts"].items()]
    a = d["args"]
    head = (
        f"{a['n']}-case phantoms at {a['size']} px, models at {a['image_size']} px, seeds {a['seeds']}, "
        f"confounders {a['confounders']} (strength {a['strength']})."
    )
    return f"{head}\n\n{md_table(['verdict', 'held'], rows)}\n\n{machine_line(d)}"


def _audit_null(r: Path) -> str:
    d = load("audit_null", r)
    rows = []
    for res in d["results"]:
        attrs = res["attributes"]
        flagged = sum(bool(a["flagged"]) for a in attrs)
        below = sum(a["p_value"] < 0.05 for a in attrs)
        rows.append(
            [res["index"].rsplit("/", 1)[-1], len(attrs), flagged, f"{below / len(attrs):.2f}"]
        )
    t = md_table(["index", "random attributes", "flagged", "share of raw p < 0.05"], rows)
    return f"{t}\n\n{machine_line(d)}"


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.2g}" if x < 0.1 else f"{x:.2f}"


HELDOUT_ATTR = {
    "ruler": "ruler",
    "marker": "site",
    "marker1": "site",
    "device": "device",
    "tag": "tag",
}
HELDOUT_WHAT = {
    "ruler": "ruler tied to melanoma (0.9): `ruler` flagged",
    "marker": "burned-in site letter tied to the class (0.9): `site` flagged",
    "marker1": "burned-in site letter on every train/val case of its class (1.0): `site` flagged",
    "device": "device (colour cast, vignette, blur) tied to the class (0.9): `device` flagged",
    "tag": "**hard case**: `tag` column = label on 90 % of train/val, not in the pixels: "
    "`tag` flagged",
    "none": "same clean runs: anything else flagged",
}
HELDOUT_HEAD = ["condition", "runs", "flagged", "rate [95% CI, Clopper-Pearson]", "model uses it"]
YES_NO = {True: "yes", False: "no", None: "n/a"}


def _rate_cell(c: dict) -> list:
    if not c["n"]:
        return [0, 0, "n/a"]
    lo, hi = c["ci95"]
    return [c["n"], c["k"], f"{c['rate']:.2f} [{lo:.2f}, {hi:.2f}]"]


def _used_in(doc: dict, cond: str) -> str:
    runs = [x for x in doc["runs"] if x["condition"] == cond and x.get("intervention")]
    if not runs:
        return "—"
    pulls = [x["intervention"]["pull"] for x in runs]
    k = sum(bool(x["used"]) for x in runs)
    return f"{k}/{len(runs)} (pull {min(pulls):+.2f} to {max(pulls):+.2f})"


def _heldout_misses(doc: dict) -> str:
    """'Used but not flagged: ...' with each miss's pull and both tests' lifts (and, where the
    run recorded it, the weakest lift the query-side test could have flagged)."""
    out = []
    for x in doc["runs"]:
        a = x["attributes"][HELDOUT_ATTR[x["condition"]]]
        if not x.get("used") or a["flagged"]:
            continue
        dq = a.get("detectable_lift_query")
        out.append(
            f"{x['condition']} seed {x['seed']} (pull {x['intervention']['pull']:.2f}, "
            f"index-side lift {_g(a.get('lift'))} Holm p {_g(a.get('p_value_holm'))}, "
            f"query-side lift {_g(a.get('lift_query'))} Holm p {_g(a.get('p_value_holm_query'))}"
            + (f", could flag from {dq:.2f}" if dq is not None else "")
            + ")"
        )
    return " Used but not flagged: " + "; ".join(out) + "." if out else ""


def _heldout_table(doc: dict, preregistered: bool = False) -> str:
    rows = [
        [HELDOUT_WHAT[k], *_rate_cell(v), _used_in(doc, k)]
        for k, v in doc["conditions"].items()
        if v["n"]
    ]
    if preregistered:
        rows.append(
            ["power, every confounded run (as first pre-registered)", *_rate_cell(doc["power"]), ""]
        )
    rows.append(
        [
            "**power where the model uses its confounder**"
            + (" (intervention)" if preregistered else ""),
            *_rate_cell(doc["power_where_used"]),
            "",
        ]
    )
    rows.append(
        [
            "flagged where the model ignores its confounder",
            *_rate_cell(doc["flagged_where_ignored"]),
            "",
        ]
    )
    rows.append(["**false flags** (hard case + clean)", *_rate_cell(doc["false_flags"]), ""])
    return md_table(HELDOUT_HEAD, rows)


def _pooled_power(docs: list[dict], min_pull: float = 0.0, max_pull: float = 9.0) -> str:
    """Flagged / used runs over several sets, for uses with min_pull <= pull < max_pull."""
    from scipy.stats import binomtest

    k = n = 0
    for doc in docs:
        for x in doc["runs"]:
            if x.get("used") and min_pull <= x["intervention"]["pull"] < max_pull:
                n += 1
                k += bool(x["attributes"][HELDOUT_ATTR[x["condition"]]]["flagged"])
    if not n:
        return "no run"
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return f"{k}/{n} = {k / n:.2f} [{ci.low:.2f}, {ci.high:.2f}]"


def _audit_heldout(r: Path) -> str:
    """The held-out audit table: frozen cut-offs on photo phantoms, the hard case its own row;
    then the fresh-seed validation and the same rule on phantoms twice the size."""
    d = load("audit_heldout", r)
    a = d["args"]
    head = (
        f"{a['n']}-case RGB photo phantoms at {a['size']} px, models at {a['image_size']} px, "
        f"{a['epochs']} epochs, seeds {a['seeds']}, {a['permutations']} permutations. "
        "Model uses it = the intervention: each test image re-rendered with its confounder "
        "changed and nothing else (other letter, other device, ruler flipped) moves >= 5 % of "
        "its top-5 neighbours to the new value (pull; the x-ray audit's ground truth)."
    )
    tail = (
        "Cut-offs held (power where used >= 0.95 and false flags <= 0.05): "
        f"**{YES_NO[d['cutoffs_held']]}**; by the first pre-registered rule (power over every "
        f"confounded run): {YES_NO[d['cutoffs_held_preregistered']]}."
    )
    sens = d.get("alpha_sensitivity") or {}
    if sens:

        def frac(c: dict) -> str:
            return f"{c['k']}/{c['n']}"

        tail += (
            " The same runs with the concordance level at "
            + "; at ".join(
                f"{a}: power where used {frac(v['power_where_used'])}, flagged where ignored "
                f"{frac(v['flagged_where_ignored'])}, false flags {frac(v['false_flags'])}"
                for a, v in sens.items()
            )
            + "."
        )
    tail += _heldout_misses(d)
    out = f"{head}\n\n{_heldout_table(d, preregistered=True)}\n\n{tail}\n\n{machine_line(d)}"
    docs = [d]
    v_path = r / "audit_heldout_validation.json"
    if v_path.is_file():
        v = json.loads(v_path.read_text())
        docs.append(v)
        out += (
            f"\n\nFresh seeds {v['args']['seeds']} (phantoms and models never seen while the rule "
            f"was looked at), same cut-offs:\n\n{_heldout_table(v)}\n\nCut-offs held there: "
            f"**{YES_NO[v['cutoffs_held']]}**.{_heldout_misses(v)} Both sets pooled: power where "
            f"used {_pooled_power(docs)}. {machine_line(v)}"
        )
    b_path = r / "audit_heldout_600.json"
    if b_path.is_file():
        b = json.loads(b_path.read_text())
        ba = b["args"]
        lifts = [
            x["attributes"][HELDOUT_ATTR[x["condition"]]].get("detectable_lift_query")
            for x in b["runs"]
            if x["condition"] in HELDOUT_ATTR
        ]
        lifts = [x for x in lifts if x is not None]
        span = (
            f" The weakest lift the query-side test could flag for the confounder's attribute: "
            f"median {statistics.median(lifts):.2f} ({min(lifts):.2f}-{max(lifts):.2f})."
            if lifts
            else ""
        )
        out += (
            f"\n\nTwice the cases: {ba['n']}-case phantoms (about {round(0.15 * ba['n'])} test "
            f"queries), fresh seeds {ba['seeds']}, the same cut-offs and settings otherwise:"
            f"\n\n{_heldout_table(b)}\n\nCut-offs held there: "
            f"**{YES_NO[b['cutoffs_held']]}**.{_heldout_misses(b)}{span} By strength of use, "
            f"all {len(docs) + 1} sets: pull >= 0.15 flagged "
            f"{_pooled_power([*docs, b], 0.15)}, pull 0.05-0.15 flagged "
            f"{_pooled_power([*docs, b], 0.05, 0.15)}. {machine_line(b)}"
        )
    return out


def _audit_levels(r: Path) -> str:
    """The stored held-out runs re-decided under a grid of concordance levels and probe floors:
    whether any pair of cut-offs meets the goal on 45 queries, and on 90."""
    d = load("audit_levels", r)
    alphas, margins = d["args"]["alphas"], d["args"]["margins"]
    g = d["goal"]
    parts = [
        f"Each cell: power where used · flagged where ignored · false flags; **bold** where all "
        f"three meet the goal (power >= {g['power_where_used']}, both wrong-flag rates <= "
        f"{g['wrong_flags']}). Frozen rule: level 0.01, probe floor 0.10."
    ]
    for s in d["sets"].values():
        rows = []
        for m in margins:
            row = [f"probe floor {m:g}"]
            for a in alphas:
                c = next(x for x in s["grid"] if x["alpha"] == a and x["min_probe_margin"] == m)
                txt = " · ".join(
                    f"{c[k]['k']}/{c[k]['n']}"
                    for k in ("power_where_used", "flagged_where_ignored", "false_flags")
                )
                row.append(f"**{txt}**" if c["meets_goal"] else txt)
            rows.append(row)
        head = [f"{s['n_cases']} cases, {s['test_queries']} queries"] + [
            f"level {a:g}" for a in alphas
        ]
        lo = s["misses_at_loosest"]
        why = "; ".join(
            f"{x['condition']} seed {x['seed']} (pull {x['pull']:.2f}: {', '.join(x['fails'])})"
            for x in lo["runs"]
        )
        parts.append(
            f"{md_table(head, rows)}\n\nSeeds {', '.join(s['seeds'])} ({s['runs']} runs). Any "
            f"cell meets the goal: **{YES_NO[s['any_cell_meets_goal']]}**; best power "
            f"{s['best_power']:.2f}."
            + (
                f" Still missed at level {lo['alpha']:g} and probe floor "
                f"{lo['min_probe_margin']:g}, and the gate that stops each: {why}."
                if lo["runs"]
                else ""
            )
        )
    parts.append(machine_line(d))
    return "\n\n".join(parts)


def _depth_extent(r: Path) -> str:
    """Extent estimates from the model's own saliency, appended to the embedding as a code:
    their within-class rank correlation with lesion size and the size ratio they give."""
    d = load("depth_extent", r)
    models = d["models"]
    weights = d["weights"]
    names = list(next(iter(models.values()))["extents"])
    head = ["extent (block)"] + [
        f"{m}: within-class ρ with size (min – max); size ratio at c = "
        + " / ".join(f"{c:g}" for c in weights)
        for m in models
    ]
    rows = [
        ["none: the index's embedding"]
        + [f"size ratio {v['index_embedding']['size_ratio']:.2f}" for v in models.values()]
    ]
    for n in names:
        cam, _, kind = n.partition("_")
        what = {"pr": "effective cells", "half": "cells above half max"}.get(kind)
        cam = cam.replace("gc@", "Grad-CAM @ features.").replace("lc@", "LayerCAM @ features.")
        row = [f"{cam}: {what}" if what else "true lesion size (oracle)"]
        for v in models.values():
            e = v["extents"][n]
            rho = list(e["spearman_with_size"].values())
            keys = [f"c{c:g}".replace(".", "_") for c in weights]
            sizes = " / ".join(f"{e[k]['size_ratio']:.2f}" for k in keys)
            p5 = min(e[k]["precision_at_5"] for k in keys)
            row.append(f"{min(rho):.2f} – {max(rho):.2f}; {sizes} (P@5 ≥ {p5:.2f})")
        rows.append(row)
    return "\n\n".join([md_table(head, rows), machine_line(d)])


def _gpu_path(r: Path) -> str:
    """The CUDA path measured on a GPU: training with AMP, embedding, queries, search at scale."""
    d = load("gpu_path", r)
    emb, q = d["embedding"], d["query"]
    rows = []
    full = d.get("train_defaults")
    if full:
        rows.append(
            [
                "`casebase train`, CLI defaults",
                f"{full['seconds']:.1f} s",
                f"{full['n_train']} train cases at {full['image_size']} px, "
                f"{full['epochs_run']} epochs",
            ]
        )
    t = d["training"]
    rows.append(
        [
            "training uses AMP",
            "yes" if t["amp"] else "**no**",
            f"autocast on {', '.join(t['autocast_devices'])}, GradScaler "
            f"{'on' if all(t['grad_scaler_enabled']) else 'off'}",
        ]
    )
    ips = emb["images_per_s"]
    rows.append(
        [
            "embedding, images/s (saliency-weighted / plain forward)",
            f"{ips['saliency']:,.0f} / {ips['plain']:,.0f}",
            f"batches of 64 already decoded; ratio {emb['saliency_vs_plain']:.2f}",
        ]
    )
    g = emb["gradcam_ms_per_map"]
    rows.append(
        [
            "Grad-CAM, ms per map (closed form / captum LayerGradCam)",
            f"{g['closed form']:.3f} / {g['registry gradcam']:.3f}",
            "batch of 16",
        ]
    )
    b = d["build"]
    rows.append(
        [
            "`index build`, end to end",
            f"{b['images_per_s']:.0f} images/s",
            f"{b['n']} cases, PNG decoding on the CPU included",
        ]
    )
    for v, s in q["latency_ms"].items():
        rows.append([f"query p50 / p95: {v}", f"{s['p50']:.1f} / {s['p95']:.1f} ms", "k = 5"])
    for s in d.get("searches") or [d["search"]]:
        for b_, label in (("qps_batch1", "1 query"), ("qps_batch100", "100 queries")):
            rows.append(
                [
                    f"Flat search over {s['n']:,} vectors (128-d), {label} at a time",
                    f"{s[b_]['gpu']:,.0f} q/s ({s['backend']})",
                    f"FAISS Flat on the CPU {s[b_]['cpu']:,.1f} q/s "
                    + (
                        "(one thread, as casebase runs single queries)"
                        if b_ == "qps_batch1"
                        else f"({d['machine'].get('faiss_omp_threads', '?')} threads)"
                    )
                    + f"; top-10 agreement {s['top10_agreement']:.4f}",
                ]
            )
    faiss_gpu = any(s.get("faiss_gpu_installed") for s in d.get("searches") or [d["search"]])
    note = (
        "faiss-gpu was installed."
        if faiss_gpu
        else "faiss-gpu was not installed there (the machine had no network and the "
        "`faiss-gpu-cu12` wheel needs CUDA 12 libraries larger than what could be carried), so "
        "the search ran on casebase's torch-cuda backend for Flat indexes (exact, the same "
        "top-10 as FAISS); FAISS's own GPU indexes were not measured."
    )
    return (
        f"{md_table(['check', 'result', 'detail'], rows)}\n\n{note} Data: the photo phantom "
        f"of bench/gpu_device.sh (`casebase phantom OUT --n 1200 --seed 21 --modality photo`; "
        f"its {b['n']} train and val cases indexed). {machine_line(d)}"
    )


def _ray_scaling(r: Path) -> str:
    d = load("ray_scaling", r)
    rows = [[k, f"{v:.1f}"] for k, v in d["images_per_second_median"].items()]
    # The 1-actor run keeps two cores busy: one decodes (Ray Data tasks), one embeds.
    # So the CPU cost of an image is 2 cores / throughput, not 1 / throughput.
    one = d["images_per_second_median"]["ray-1-actor"]
    core_hours = 10_000_000 * 2 / one / 3600
    return (
        f"{d['n_images']:,} images.\n\n{md_table(['engine', 'images/s'], rows)}\n\n"
        f"2 vs 1 actor: {d['ratio_2_vs_1_actor']:.2f}×. Plan for 10M images from the 1-actor run, "
        f"counting both of its cores (decode and embed): {2 / one * 1000:.0f} core-ms per image, "
        f"{core_hours:.0f} core-hours, about {core_hours / 128 * 60:.0f} minutes on 8 nodes × 16 cores "
        f"if Ray scales linearly across nodes (not verified here).\n\n{machine_line(d)}"
    )


def _runs_table(rows_spec, runs: dict) -> str:
    return md_table(
        [h for h, _ in rows_spec], [[fn(k, v) for _, fn in rows_spec] for k, v in runs.items()]
    )


def _matched_regions(r: Path) -> str:
    d = load("matched_regions", r)
    spec = [
        ("index", lambda k, v: f"{k} ({v['n_queries']} queries × {v['pairs_per_query']})"),
        ("P@5", lambda k, v: f"{v['precision_at_5']:.2f}"),
        ("regions carry (median)", lambda k, v: f"{v['carried_median']:.2f}"),
        (
            "top region on the lesion, worst class",
            lambda k, v: (
                f"{v['top_touches_lesion_min_class']:.2f} "
                f"({min(v['top_touches_lesion_by_class'], key=v['top_touches_lesion_by_class'].get)})"
            ),
        ),
        ("score gap top-1 − top-10", lambda k, v: f"{v['score_gap_median']:.3f}"),
        ("cosine gap", lambda k, v: f"{v['cosine_gap_median']:.4f}"),
        (
            "lesion × lesion share (chance)",
            lambda k, v: (
                f"{v['lesion_x_lesion_median']:.2f} ({v['lesion_x_lesion_chance_median']:.3f})"
            ),
        ),
    ]
    return f"{_runs_table(spec, d['runs'])}\n\n{machine_line(d)}"


def _refine(r: Path) -> str:
    d = load("refine", r)
    lat = [
        [
            k,
            f"{v['per_query_median_s']['no_regions'] * 1000:.0f}",
            f"{v['ratio_regions_vs_no_regions']:.2f}×",
            f"{v['ratio_reencoded_vs_no_regions']:.2f}×",
            f"{v['ratio_no_regions_vs_bare_forward']:.2f}×",
        ]
        for k, v in d["latency"].items()
    ]
    t1 = md_table(
        [
            "index",
            "retrieval-only ms",
            "with matched regions (from the bundle)",
            "re-encoding neighbours",
            "retrieval-only vs bare forward",
        ],
        lat,
    )
    ph = [
        [
            k,
            v["n_queries"],
            f"{v['precision_at_5']['lesion_box']:.2f}",
            f"{v['precision_at_5']['whole_image']:.2f}",
            f"{v['top_region_case_box_on_case_lesion']:.2f}",
            f"{v['site_share_at_5']['lesion_box']:.2f} / {v['site_share_at_5']['whole_image']:.2f}",
        ]
        for k, v in d["phantom"].items()
    ]
    t2 = md_table(
        [
            "phantom index",
            "queries",
            "P@5, lesion box",
            "P@5, whole image",
            "neighbour's top region on its lesion",
            "same site, box / whole",
        ],
        ph,
    )
    sc = []
    for n, v in d.get("scale", {}).items():
        for s in v["sweep"]:
            sc.append(
                [
                    f"{int(n):,}",
                    v["factory"],
                    s.get("nprobe") or v.get("nprobe") or "—",
                    s["shortlist"],
                    f"{s['recall_at_10']:.3f}",
                    f"{s['p50_ms']:.0f}",
                    f"{v['faiss_bytes'] / 1e9:.2f} GB + {v['cells_npy_bytes'] / 1e9:.2f} GB cells on disk",
                ]
            )
    t3 = md_table(
        ["cases", "cell index", "nprobe", "shortlist", "recall@10 vs exact", "p50 ms", "memory"],
        sc,
    )
    return f"{t1}\n\n{t2}\n\n{t3}\n\n{machine_line(d)}"


def _conformal(r: Path) -> str:
    d = load("conformal", r)
    rows = []
    for k, v in d["datasets"].items():
        t = v["test"]
        ps, cal = t["prediction_sets"], t["calibration"]
        lo, hi = ps["coverage_ci95"]
        rows.append(
            [
                k,
                v["n_indexed"],
                f"{t['classifier_accuracy']:.2f}",
                ps["n"],
                f"{ps['coverage']:.3f} [{lo:.2f}, {hi:.2f}]",
                f"{ps['mean_size']:.2f}",
                f"{ps['randomized']['coverage']:.3f}",
                f"{cal['ece_before']:.3f} → {cal['ece_after']:.3f}",
            ]
        )
    t = md_table(
        [
            "phantom",
            "indexed",
            "accuracy",
            "test cases",
            "coverage (95% CI)",
            "mean set size",
            "coverage, randomised sets",
            "ECE before → after",
        ],
        rows,
    )
    return f"Target coverage {d['target_coverage']}.\n\n{t}\n\n{machine_line(d)}"


def _concepts(r: Path) -> str:
    d = load("concepts", r)
    use, tcav = d.get("use", {}), d["tcav"]
    rows = []
    for ph, v in tcav.items():
        if not isinstance(v, dict) or "concepts" not in v:  # "measured": a timestamp
            continue
        truth = use.get(ph, {})
        for name, c in v["concepts"].items():
            for cls, t in c["classes"].items():
                gt = truth.get("classes", {}).get(cls) if name == truth.get("artefact") else None
                rows.append(
                    [
                        ph,
                        f"`{name}`",
                        cls,
                        f"{t['tcav_score']:.2f} ({t['random_mean']:.2f} ± {t['random_std']:.2f})",
                        f"{t['effect']:+.2f} (± {t['effect_random_std']:.2f})",
                        f"{t['p_value']:.2g}",
                        "**yes**" if t["significant"] else "no",
                        f"{gt['delta_centred_logit']:+.2f}" if gt else "—",
                    ]
                )
    t1 = md_table(
        [
            "phantom",
            "concept",
            "class",
            "TCAV score (random sets)",
            "effect (random sd)",
            "corrected p",
            "significant",
            "pasting the artefact in",
        ],
        rows,
    )
    arows = []
    for ph, v in tcav.items():
        if not isinstance(v, dict) or "acceptance" not in v:
            continue
        acc = v["acceptance"][v["layer"]]["checks"]
        arows += [[ph, text, "pass" if ok else "**FAIL**"] for text, ok in acc.items()]
    t_acc = md_table(["phantom", "acceptance at the default layer", "result"], arows)
    urows = []
    for ph, u in use.items():
        if not isinstance(u, dict) or "classes" not in u:
            continue
        tied = u.get("tied_class")
        lead = (
            u["classes"][tied]
            if tied
            else max(u["classes"].values(), key=lambda x: abs(x["delta_centred_logit"]))
        )
        ts = u.get("test_split")
        urows.append(
            [
                ph,
                f"`{u['artefact']}`" + (f" (tied to {tied})" if tied else " (never seen)"),
                f"{u['prediction_changed']:.0%}",
                ", ".join(f"{c} {x['delta_centred_logit']:+.2f}" for c, x in u["classes"].items()),
                f"{lead['share_rising']:.0%}" if tied else "—",
                f"{ts['p_tied_with_artefact']:.3f} / {ts['p_tied_without_artefact']:.3f}"
                if ts
                else "—",
            ]
        )
    t_use = md_table(
        [
            "phantom",
            "artefact",
            "predictions changed",
            "Δ centred logit per class",
            "tied class rises in",
            "test split P(tied) with / without",
        ],
        urows,
    )
    srows = []
    for ph, v in d.get("search", {}).items():
        if not isinstance(v, dict) or "before" not in v:
            continue
        share = next(k for k in v["before"] if k.startswith("share"))
        srows.append(
            [
                ph,
                share.replace("share_", "").replace("_", " "),
                f"{v['before'][share]:.3f} → {v['weight_-1'][share]:.3f} → "
                f"{v['weight_-2'][share]:.3f}",
                f"{v['chance_share']:.3f}",
                f"{v['before']['precision_at_5']:.3f} → {v['weight_-1']['precision_at_5']:.3f}"
                f" → {v['weight_-2']['precision_at_5']:.3f}",
            ]
        )
    t2 = md_table(["phantom", "top-5 sharing", "before → weight −1 → −2", "chance", "P@5"], srows)
    lc = d.get("layer_choice", {})
    lrows = [
        [
            f"`{layer.replace('backbone.', '')}`"
            + (" (default)" if layer == lc.get("chosen") else ""),
            ", ".join(v["phantoms_passing"]) or "none",
            f"{v['effect_vs_pasting_r']:.2f}",
            v["sign_agreement"],
        ]
        for layer, v in lc.items()
        if isinstance(v, dict)
    ]
    t_layer = md_table(["layer", "acceptance holds on", "effect vs pasting: r", "same sign"], lrows)
    sd = d.get("seeds", {})
    srows2 = []
    for ph, v in sd.items():
        if isinstance(v, dict) and "summary" in v:
            row = [ph]
            for design in ("set", "runs", "similarity"):
                if design not in v["summary"]:
                    row += ["—", "—"]
                    continue
                u = v["summary"][design]
                tied = u.get("artefact_tied_significant")
                row += [
                    f"{tied:.0%} (tied class)"
                    if tied is not None
                    else f"{u['artefact_any_significant']:.0%} (any class)",
                    f"{u['control_any_significant']:.0%}",
                ]
            srows2.append(row)
    n = sd.get("n_seeds")
    t_seeds = (
        md_table(
            [
                "phantom",
                f"artefact significant ({n} seeds)",
                "control significant",
                "Kim et al.'s null: artefact",
                "control",
                "similarity target: artefact",
                "control",
            ],
            srows2,
        )
        if srows2
        else ""
    )
    parts = [t_use, t1, t_acc, t_layer, t_seeds, t2]
    parts = [p for p in parts if p]
    tm = d.get("timing", {}).get("default_layer")
    if tm:
        la = tm["loadavg_before"][0]
        parts.append(
            f"{tm['concepts']} concepts × {tm['classes']} classes × {tm['random_runs']} random "
            f"runs on the {d['timing']['n_indexed']:,}-case index: {tm['wall_s']:.0f} s wall, "
            f"{tm['cpu_s']:.0f} s CPU ({tm['torch_threads']} threads, load {la:.1f} before)."
        )
    parts.append(machine_line(d))
    return "\n\n".join(parts)


def _volume_sanity(g: dict | None) -> str:
    if not g:
        return "not run"
    return (
        f"{g['sanity_check']} ({g['randomization_spearman']:+.2f}); "
        f"{g['deletion_gain']:+.3f}, {g['faithfulness'] or 'no verdict'}"
    )


def _volumes(r: Path) -> str:
    d = load("volumes", r)
    rows = []
    for v in d["phantoms"].values():
        ph, ep, tg = v["phantom"], v["epochs"], v["targets"]
        m = v["machine"]
        pg, pgs = v["pointing_game"], v["pointing_game_strict"]
        per = v["eval"].get("per_class", {})
        worst = min(per.items(), key=lambda kv: kv[1]["precision_at_5"]) if per else None
        rows.append(
            [
                f"{ph['modality']} ({ph['n']} volumes"
                + (f" of {ph['depth']} x {ph['size']} x {ph['size']}" if "size" in ph else "")
                + (f", {ph['format']}" if "format" in ph else "")
                + (", a fourth class 'normal' without a lesion" if ph.get("normals") else "")
                + f", seed {ph['seed']}): {v.get('cli', 'defaults')}"
                + (f", train --seed {v['train_seed']}" if v.get("train_seed") is not None else "")
                + (" (the model above, re-evaluated)" if v.get("model_reused_from") else ""),
                f"{v['precision_at_5']:.2f}"
                + (f" ({worst[0]} {worst[1]['precision_at_5']:.2f})" if worst else ""),
                f"{pg['gradcam']:.2f} ({pgs['gradcam']:.2f})",
                str(v.get("cam_layer", "the last block")).replace("backbone.", "")
                + (
                    ", of logit(c) − logit(normal)"
                    if v.get("class_score_explained", "logit") != "logit"
                    else ""
                ),
                f"{pg['occlusion']:.2f} ({pgs['occlusion']:.2f})"
                if "occlusion" in pg
                else "not run",
                _volume_sanity(v.get("sanity", {}).get("gradcam")),
                f"{v['similarity_lesion_share']['median_share']:.3f} "
                f"({v['similarity_lesion_share']['median_chance']:.4f})",
                f"{v['boxes']['inside']}/{v['boxes']['boxes']}",
                f"{v['train_seconds']:.0f}",
                f"{ep['epochs_run']} of {ep['max_epochs']} ({ep['epochs_total']} in all)",
                f"{str(v['date'])[:10]}, "
                + (
                    f"{m['cuda_device']} ({m['cpus_usable']} cores)"
                    if m.get("cuda_device")
                    else f"{m['cpus_usable']} cores, "
                    + (
                        f"{m['torch_threads']} torch thread, "
                        if m.get("torch_threads", m["cpus_usable"]) < m["cpus_usable"]
                        else ""
                    )
                    + f"load {m['loadavg_start'][0]:.1f} → {m['loadavg_end'][0]:.1f}"
                ),
            ]
        )
    t = md_table(
        [
            "phantom: CLI",
            f"P@5 (≥ {tg['precision_at_5']} wanted; worst class)",
            f"Grad-CAM pointing game, half-cell tolerance (strict) (≥ {tg['gradcam_pointing_game']})",
            "Grad-CAM block",
            "occlusion pointing game (strict)",
            "Grad-CAM randomisation check (cascade ρ); deletion gain",
            "similarity in lesion × lesion cells, median (chance)",
            "matched boxes inside the volume",
            f"training s (≤ {tg['train_seconds']} on 2 cores)",
            "epochs kept (all schedules)",
            "measured",
        ],
        rows,
    )
    m = next(v for v in d["phantoms"].values() if not v["machine"].get("cuda_device"))["machine"]
    gpu = "no GPU"
    on_gpu = [v["machine"] for v in d["phantoms"].values() if v["machine"].get("cuda_device")]
    gpu_note = (
        f" Rows measured on {on_gpu[0]['cuda_device']}: {on_gpu[0]['cpus_usable']} CPU cores, "
        f"torch {on_gpu[0]['torch'].split('+')[0]}, bench/gpu_device.sh."
        if on_gpu
        else ""
    )
    return (
        f"{t}\n\nDefaults: the training recipe of issue 23's fix (a peak-pooled cross-entropy "
        "of each channel's top cells, 6 cases a step); `--peak-pool both`: a second one added, "
        "of each class's top cells of its per-cell logit map; `--zero-init-residual`: the "
        "residual blocks start as the identity; former defaults: no peak term, "
        "24 cases a step. "
        "Each row: the phantom made, `casebase train` (of 300 volumes 210 train / 45 val, of 400 "
        "280 / 60; model input 32 x 64 x 64), `index build`, `eval --json` (the 45 or 60 test "
        "queries, own patient excluded) and `explain-eval` on the test volumes with a lesion. "
        f"Rows on 2 cores: *{m['cpu_model']}, {m['cpus_usable']} cores, {gpu}, torch "
        f"{m['torch'].split('+')[0]}.*{gpu_note}"
    )


def _volume_methods(r: Path) -> str:
    """Every method on the CT volume model: 3-D pointing game, energy, a re-initialised model."""
    d = load("volume_methods", r)
    rand = d.get("random_model") or {}
    rows = []
    for m, v in sorted(d["methods"].items(), key=lambda kv: -kv[1]["pointing_game"]):
        rv = rand.get(m)
        rows.append(
            [
                f"`{m}`",
                f"{v['pointing_game']:.2f} ({v['pointing_game_strict']:.2f})",
                f"{v['mask_energy']:.3f}",
                f"{rv['pointing_game']:.2f} ({rv['pointing_game_strict']:.2f})"
                if rv
                else "not run",
                f"{v['seconds_per_map']:.2f}",
            ]
        )
    first = next(iter(d["methods"].values()))
    t = md_table(
        [
            "method",
            "3-D pointing game, half-cell tolerance (strict)",
            f"mask energy (chance {first['mask_area']:.4f})",
            "same, model re-initialised",
            "s per map (1 thread)",
        ],
        rows,
    )
    sweep = "; ".join(
        f"{k.replace('/', ' supervoxels asked / ')} samples: {v['pointing_game']:.2f} "
        f"({v['pointing_game_strict']:.2f}), {v['seconds_per_map']:.1f} s"
        for k, v in d["lime_sweep"].items()
    )
    n_sweep = next(iter(d["lime_sweep"].values()))["n_cases"]
    return (
        f"{t}\n\n{first['n_cases']} CT test volumes (the CPU-trained `ct` model of the table "
        f"above, P@5 {load('volumes', r)['phantoms']['ct (former defaults)']['precision_at_5']:.2f}). LIME's 3-D SLIC supervoxels on {n_sweep} of them: {sweep} "
        f"(default {d['lime_default']['segments']} / {d['lime_default']['samples']}). "
        f"{machine_line(d)}"
    )


_SEED_RECIPES = {
    "peak": "peak-pooled CE, 24 cases a step",
    "peak_b24": "peak-pooled CE, 12 cases a step",
    "peak_b12": "peak-pooled CE, 6 cases a step (the defaults)",
    "def6": "peak-pooled CE, 6 cases a step (the defaults)",
}


def _volume_seeds(r: Path) -> str:
    """CT training per recipe and seed: best val P@1 / accuracy and the schedules it took."""
    d = load("volume_seeds", r)
    rows = []
    for v in sorted(d["runs"].values(), key=lambda v: (v["name"], v["seed"])):
        first = v["attempts"][0]
        rows.append(
            [
                _SEED_RECIPES.get(v["name"], v["name"]),
                v["seed"],
                f"{v['best']['precision_at_1']:.2f} / {v['best']['accuracy']:.2f}",
                "yes" if not first["stalled"] else f"no: {len(v['attempts'])} schedules",
                v["summary"],
            ]
        )
    t = md_table(
        [
            "recipe",
            "train --seed",
            "best val P@1 / accuracy (chance 0.33)",
            "first schedule learned",
            "epochs",
        ],
        rows,
    )
    return f"{t}\n\n{d['note']}"


def _cell_alignment(r: Path) -> str:
    d = load("cell_alignment", r)
    rows = []
    for name, v in d["datasets"].items():
        grid = " x ".join(str(c) for c in v["grid"])
        for how, label in (
            ("half_cell_off", "half a cell off (before)"),
            ("centred", "centred (now)"),
        ):
            u = v[how]
            by = ", ".join(
                f"{k} {x:.2f}" for k, x in sorted(u["pointing_game"].items()) if k != "all"
            )
            rows.append(
                [
                    f"{name} ({v['n_cases']} test cases, grid {grid})",
                    label,
                    f"{u['pointing_game']['all']:.2f} ({u['pointing_game_strict']['all']:.2f})",
                    by,
                    ", ".join(f"{x:+.2f}" for x in u["mean_offset_cells"]),
                ]
            )
    t = md_table(
        [
            "model",
            "cell i upsampled to",
            "Grad-CAM pointing game, half-cell tolerance (strict)",
            "by class",
            "peak minus lesion centroid, mean, in cells (z,) y, x",
        ],
        rows,
    )
    return (
        f"{t}\n\nThe registry's Grad-CAM of the predicted class at the feature grid, upsampled "
        "either way, then mapped to the original size; chest and photo: the 2-D phantoms of "
        "the depth tables (CLI defaults); ct, ct96 and their 'normal' variants: the volume "
        f"table's CPU models. {machine_line(d)}"
    )


def _volume_ceiling(r: Path) -> str:
    d = load("volume_ceiling", r)
    rows = [
        [
            f"{k} ({v['phantom']['n']} volumes, seed {v['phantom']['seed']})",
            " x ".join(str(c) for c in v["crop"]),
            len(v["runs"]),
            f"{v['test_accuracy_mean']:.2f} ({v['test_accuracy_min']:.2f}–{v['test_accuracy_max']:.2f})",
        ]
        for k, v in d["phantoms"].items()
    ]
    t = md_table(
        ["phantom", "box around the lesion (voxels)", "seeds", "test accuracy, mean (range)"], rows
    )
    return f"{t}\n\n{machine_line(d)}"


def _volume_gradcam_peaks(r: Path) -> str:
    d = load("volume_gradcam_peaks", r)
    rows, notes = [], []
    for model, m in d["models"].items():
        cells = math.prod(m["grid"])
        rows += [
            [
                model,
                lab,
                v["n"],
                f"{v['hit']:.2f}",
                f"{v['median_rank_of_best_lesion_cell']:.0f} of {cells}",
                f"{v['contrast_hit']:.2f}",
            ]
            for lab, v in m["per_class"].items()
        ]
        rows.append([model, "all", m["n_cases"], f"{m['hit']:.2f}", "", f"{m['contrast_hit']:.2f}"])
        top = ", ".join(f"{c} ({n})" for c, n in m["most_frequent_miss_cells"][:3])
        notes.append(
            f"{model}: of the {m['misses']} misses, {m['misses_in_a_saturated_cell']} land in a "
            f"cell holding voxels saturated by the lung window (in this phantom, the spine); the "
            f"most frequent missed cells: {top}."
        )
    t = md_table(
        [
            "model (train --peak-pool, initialisation)",
            "class",
            "test volumes",
            "Grad-CAM maximum in a lesion cell",
            "best lesion cell's rank, median",
            "same, class-contrast map",
        ],
        rows,
    )
    grid = next(iter(d["models"].values()))["grid"]
    return (
        f"{t}\n\nFeature volume {' x '.join(str(g) for g in grid)} cells (d, h, w), the "
        "closed-form Grad-CAM of the predicted class before upsampling; every model trained "
        f"with the CLI defaults otherwise, on the same CT phantom. {' '.join(notes)} "
        f"{machine_line(d)}"
    )


def _depth_pooling(r: Path) -> str:
    d = load("depth_pooling", r)
    labels = list(d["models"])
    vectors = list(d["models"][labels[0]]["vectors"])
    rows = []
    named = {
        "index_embedding": "the index's embedding (saliency-weighted, projected)",
        "index_embedding_whitened": "the same, within-class whitened",
    }
    for k in vectors:
        pooling, _, block = k.rpartition("_")
        where = "all three blocks" if block == "all" else f"features.{block.removeprefix('block')}"
        row = [named.get(k, f"{pooling.replace('_', ' ')} @ {where}")]
        for lab in labels:
            m = d["models"][lab]["vectors"][k]
            row.append(
                f"{m['size_ratio']:.2f} ({m['precision_at_5']:.2f}; R² {m['size_probe_r2']:.2f})"
            )
        rows.append(row)
    t = md_table(
        ["pooling @ block"] + [f"{lab}: size ratio (P@5; size probe R²)" for lab in labels], rows
    )
    return (
        f"{t}\n\nOne model per phantom (600 cases, seed 21, 128 px, the CLI defaults); the "
        "vectors unit-normalised, the three blocks concatenated with equal weight; size ratio as "
        "in the tables above (≤ 0.5 wanted); R²: a ridge fit of lesion size on the vector within "
        f"each class, fitted on the index and scored on the queries. {machine_line(d)}"
    )


def _by_class(block: dict) -> str:
    """A block's pointing game per class (its keys other than the summary ones)."""
    classes = sorted(k for k in block if k not in ("all", "module", "shape", "name"))
    return ", ".join(f"{c} {block[c]['pointing_game']:.2f}" for c in classes)


def _volume_cam_layer(r: Path) -> str:
    d = load("volume_cam_layer", r)
    rows = []
    for m in d["models"].values():
        model = m.get("description", m["index"])
        for v in m["blocks"].values():
            a, block = v["all"], v["name"]
            chosen = block == m["cam_layer"].replace("backbone.", "")
            rows.append(
                [
                    model,
                    f"**{block}** (Grad-CAM's block now)" if chosen else block,
                    f"{v['module'].strip('_')}, {' x '.join(str(g) for g in v['shape'][1:])}",
                    f"{a['pointing_game']:.2f} ({a['pointing_game_strict']:.2f})",
                    _by_class(v),
                    f"{a['mask_energy']:.3f}",
                ]
            )
    t = md_table(
        [
            "model",
            "block",
            "module, grid",
            "Grad-CAM pointing game, half-cell (strict)",
            "by class",
            "mask energy",
        ],
        rows,
    )
    n = ", ".join(f"{k} {m['n_cases']}" for k, m in d["models"].items())
    return (
        f"{t}\n\ncaptum LayerGradCam (ReLU) of the predicted class at each block, trilinearly "
        f"upsampled, on the first {d['args']['max_cases']} test volumes of each model less those "
        f"without a lesion ({n}); explain-eval's pointing game (tolerance: half a cell of the "
        f"4 x 8 x 8 feature volume). {machine_line(d)}"
    )


def _volume_cam_target(r: Path) -> str:
    d = load("volume_cam_target", r)
    names = {
        "own": "the class's logit (`--reference-class none`)",
        "reference": "logit minus normal's (`--reference-class auto`, the default)",
        "centred": "logit minus the mean logit",
    }
    rows = []
    cam = next(iter(next(iter(d["models"].values())).values()))["cam_layer"]  # features.N
    for label, scores in d["models"].items():
        for key, m in scores.items():
            at_cam = m["blocks"][m["cam_layer"].rsplit(".", 1)[1]]
            best = max(m["blocks"].values(), key=lambda v: v["all"]["pointing_game"])
            rows.append(
                [
                    label,
                    names.get(key, key),
                    f"{at_cam['all']['pointing_game']:.2f} ({at_cam['all']['pointing_game_strict']:.2f})",
                    _by_class(at_cam),
                    f"{best['name']} {best['all']['pointing_game']:.2f}",
                ]
            )
    t = md_table(
        [
            "model",
            "score Grad-CAM explains",
            f"pointing game at {cam} (Grad-CAM's block), half-cell (strict)",
            "by class",
            "best block",
        ],
        rows,
    )
    n = ", ".join(f"{k} {next(iter(v.values()))['n_cases']}" for k, v in d["models"].items())
    return (
        f"{t}\n\ncaptum LayerGradCam (ReLU) of the predicted class's score at each block, on "
        f"every test volume with a lesion ({n}); explain-eval's pointing game. {machine_line(d)}"
    )


def _volume_init_sweep(r: Path) -> str:
    d = load("volume_init_sweep", r)
    variants = d["variants"]
    rows = []
    order = {"ct": 0, "ct96": 1, "mr": 2}
    for run in sorted(d["runs"].values(), key=lambda v: order[v["phantom"]]):
        pt, strict = run["pointing"].get("gradcam"), run["pointing_strict"].get("gradcam")
        stalls = next((t.split()[0] for t in run["train"] if "restart(s)" in t), "0")
        secs = next((t.split()[1] for t in run["train"] if t.startswith("train_s")), "?")
        rows.append(
            [
                run["phantom"],
                f"`{run['args_as_run']}`",
                f"{run['p5']:.2f}",
                f"{pt:.2f} / {strict:.2f}" if pt is not None else "not run",
                f"{run['cell_hit']:.2f}",
                f"{stalls} stalled, {secs} s",
            ]
        )
    t = md_table(
        [
            "phantom",
            "train arguments (as run)",
            "P@5",
            "Grad-CAM pointing game, half-cell / strict",
            "Grad-CAM maximum in a lesion cell",
            "training: schedules abandoned, wall time",
        ],
        rows,
    )
    return (
        f"{t}\n\nEach row one `casebase train` with the CLI defaults plus the arguments shown, "
        f"then index build, eval and explain-eval (45 test volumes); runs in parallel on one "
        f"GPU, so the wall times are not speed figures. Pick rule, fixed before the runs: "
        f"{d['pick_rule']}; picked `{variants[d['picked']]['args_as_run']}`, then run on ct96 "
        f"(written as .npy) and MR with the default beside it. `--cell-context` existed "
        f"at commit {d['commit']} only. *Measured {d['date']} on {d['machine']['device']}.*"
    )


def _depth(r: Path) -> str:
    d = load("depth", r)
    rows = []
    for k, v in d["phantoms"].items():
        ph, tr = v["phantom"], v["train"]
        fr = v["factor_ratio"]
        rows.append(
            [
                f"{k} ({ph['modality']}, {ph['n']:,} cases, {ph['size']} px)",
                v["n_queries"],
                f"{v['precision_at_1']:.3f}",
                f"{v['precision_at_5']:.3f}",
                f"{v['map_at_r']:.3f}",
                " / ".join(
                    f"{fr[f]:.2f}"
                    for f in (
                        "lesion_size",
                        "lesion_x",
                        "lesion_y",
                        "lesion_shape",
                        "lesion_contrast",
                    )
                ),
                f"{v['raw_gap_top1_top10_median']:.4f}",
                f"{tr['epochs_run']}",
                f"{tr['cpu_seconds']:.0f}",
            ]
        )
    t = md_table(
        [
            "phantom",
            "test queries",
            "P@1",
            "P@5",
            "MAP@R",
            "factor ratio: size / x / y / shape / contrast (≤ 0.5 wanted)",
            "raw cosine gap top-1 − top-10",
            "epochs",
            "training CPU s",
        ],
        rows,
    )
    return (
        f"{t}\n\nFactor ratio: mean |difference| of a lesion factor between a query and its same-label "
        f"top-5 neighbours, over that of random same-label pairs (1 = neighbours no more alike than chance).\n\n"
        f"{machine_line(d)}"
    )


def _depth_variants(r: Path) -> str:
    """One row per training variant and phantom (bench/depth.py --variant): label precision
    and the lesion-size ratio of the index's embedding, and of the other retrieval vectors."""
    d = load("depth_variants", r)
    alts = ("uniform", "concat", "pooled_features")
    rows, loads, threads = [], [], set()
    for label, v in d["variants"].items():
        args = ", ".join(f"{k}={val}" for k, val in v.get("train_args", {}).items()) or "defaults"
        for name, p in sorted(v["phantoms"].items()):
            alt = p.get("alternatives", {})
            rows.append(
                [
                    f"{label} ({args})",
                    f"{name} ({p['phantom']['n']:,})",
                    f"{p['precision_at_5']:.3f}",
                    f"{p['size_ratio']:.2f}",
                    f"{p['factor_ratio']['lesion_x']:.2f} / {p['factor_ratio']['lesion_y']:.2f}",
                    _num(p["factor_ratio"].get("background"), "{:.2f}"),
                    " · ".join(
                        f"{alt[a]['size_ratio']:.2f} ({alt[a]['precision_at_5']:.2f})"
                        if a in alt
                        else "–"
                        for a in alts
                    ),
                    f"{p['raw_gap_top1_top10_median']:.4f}",
                    f"{p['train']['epochs_run']}",
                    f"{p['train']['cpu_seconds']:.0f}",
                ]
            )
            m = p.get("machine", {})
            loads += [*m.get("loadavg_start", [])[:1], *m.get("loadavg_end", [])[:1]]
            threads.add(m.get("torch_threads"))
    t = md_table(
        [
            "variant (train options)",
            "phantom (cases)",
            "P@5",
            "size ratio (≤ 0.5 wanted)",
            "x / y ratio",
            "background ratio",
            "size ratio (P@5) on uniform · concatenated · pooled features",
            "raw cosine gap top-1 − top-10",
            "epochs",
            "training CPU s",
        ],
        rows,
    )
    load_text = f"load {min(loads):.1f}–{max(loads):.1f}" if loads else "load not recorded"
    return (
        f"{t}\n\nSize ratio: mean |lesion size difference| between a query and its same-label "
        "top-5 neighbours over that of random same-label cases (own patient excluded); the first "
        "ratio is the index's embedding (saliency-weighted), the others retrieve on other vectors "
        "of the same model. Background ratio: the same for the image's mean intensity outside "
        "the lesion mask (the photo's skin tone, the film's exposure; – where not measured). "
        f"One process per phantom, torch threads {', '.join(str(t) for t in sorted(threads, key=str))}"
        f"; {load_text}.\n"
    )


def _demo_and_tests(r: Path) -> str:
    d = load("demo_and_tests", r)
    parts = []
    if "demo" in d:
        st = d["demo"]["stages_s"]
        rows = [[k, f"{v:.0f}"] for k, v in st.items()]
        parts.append(
            "`casebase demo --no-app` on a fresh clone, venv already made:\n\n"
            + md_table(["stage", "seconds"], rows)
        )
    if "tests" in d:
        parts.append(
            f"The test suite (`python -m pytest -q`): {d['tests']['summary']} "
            f"({d['tests']['wall_s'] / 60:.1f} minutes wall)."
        )
    return "\n\n".join(parts + [f"Commit {d['repo_commit']}. " + machine_line(d)])


def _num(v, fmt: str) -> str:
    """A figure, or a dash where the JSON predates the key or has null (too few cases)."""
    return "—" if v is None else fmt.format(v)


def _explain_eval(name: str) -> Callable[[Path], str]:
    def render(r: Path) -> str:
        d = load(name, r)
        c = d["config"]
        parts = []
        for ds, rep in d["datasets"].items():
            rows = []
            for m, v in rep["methods"].items():
                lo, hi = v["deletion_gain_ci95"]
                ci = "n/a" if lo is None else f"[{lo:+.2f}, {hi:+.2f}]"
                rows.append(
                    [
                        f"`{m}`",
                        v["family"],
                        v["n_cases"],
                        f"{v['pointing_game']:.2f}",
                        f"{v['mask_energy']:.2f}" if v.get("mask_energy") is not None else "—",
                        f"{v['deletion_auc']:.3f} ({v['deletion_auc_random']:.3f})",
                        ci,
                        v["faithfulness"],
                        f"{v['sanity']['cascade_mean']['spearman_abs']:.2f}",
                        f"**{v['sanity_check']}**",
                        _num(v.get("faithfulness_correlation"), "{:+.2f}"),
                        _num(v.get("max_sensitivity"), "{:.2f}")
                        + (
                            f" (n={v['max_sensitivity_n_cases']})"
                            if v.get("max_sensitivity_n_cases")
                            else ""
                        ),
                        _num(v.get("seconds_per_map"), "{:.2f}"),
                    ]
                )
            parts.append(
                f"**{ds}** ({rep['n_cases']} test cases with masks; sanity on "
                f"{c['sanity_cases']} case(s) × {c['sanity_seeds']} seeds)\n\n"
                + md_table(
                    [
                        "method",
                        "family",
                        "cases",
                        "pointing game",
                        "energy",
                        "deletion AUC (random)",
                        "deletion gain 95% CI",
                        "faithfulness",
                        "cascade mean |ρ|",
                        "sanity",
                        "faithfulness corr.",
                        "max-sensitivity",
                        "s/map",
                    ],
                    rows,
                )
            )
        return "\n\n".join(parts + [machine_line(d)])

    return render


def _neighbour_tests(r: Path) -> str:
    """Hanawa et al.'s minimal tests of the neighbours as explanations, per phantom."""
    d = load("explain_eval_subclass_size", r)
    rows = []
    for ds, rep in d["datasets"].items():
        t = rep["neighbour_tests"]
        mr, ic = t["model_randomization"], t["identical_class"]
        sub = t.get("identical_subclass") or {}
        rows.append(
            [
                ds,
                t["n_queries"],
                f"ρ {mr['spearman']:+.2f}: **{mr['verdict']}**",
                f"{ic['rate']:.2f} (chance {ic['chance']:.2f}): **{ic['verdict']}**",
                f"{sub['rate']:.2f} (chance {sub['chance']:.2f}, p {sub['p_value']:.3f}): "
                f"**{sub['verdict']}**"
                if sub
                else "—",
            ]
        )
    head = [
        "phantom",
        "queries",
        "model randomisation (similarity ranks, trained vs random)",
        "identical class (top neighbour)",
        f"identical subclass: {d['config']['subclass_binned_from']} above / below the "
        "label's median",
    ]
    return "\n\n".join([md_table(head, rows), machine_line(d)])


TABLES: dict[str, Callable[[Path], str]] = {
    "neighbour_tests": _neighbour_tests,
    "build_throughput": _build_throughput,
    "search_scale": _search_scale("search_scale"),
    "search_scale_100k": _search_scale("search_scale_100k"),
    "query_latency": _query_latency,
    "gradcam_vs_reference": _gradcam_vs_reference,
    "explain_cost": _explain_cost,
    "audit_seeds": _audit_seeds,
    "audit_null": _audit_null,
    "audit_heldout": _audit_heldout,
    "audit_levels": _audit_levels,
    "ray_scaling": _ray_scaling,
    "matched_regions": _matched_regions,
    "refine": _refine,
    "conformal": _conformal,
    "concepts": _concepts,
    "depth": _depth,
    "volumes": _volumes,
    "gpu_path": _gpu_path,
    "volume_ceiling": _volume_ceiling,
    "cell_alignment": _cell_alignment,
    "volume_seeds": _volume_seeds,
    "volume_gradcam_peaks": _volume_gradcam_peaks,
    "volume_init_sweep": _volume_init_sweep,
    "volume_cam_layer": _volume_cam_layer,
    "volume_cam_target": _volume_cam_target,
    "depth_pooling": _depth_pooling,
    "depth_extent": _depth_extent,
    "volume_methods": _volume_methods,
    "depth_variants": _depth_variants,
    "explain_eval_table_chest": _explain_eval("explain_eval_table_chest"),
    "explain_eval_table_photo": _explain_eval("explain_eval_table_photo"),
    "explain_eval_sanity_chest_core": _explain_eval("explain_eval_sanity_chest_core"),
    "explain_eval_sanity_photo_core": _explain_eval("explain_eval_sanity_photo_core"),
    "demo_and_tests": _demo_and_tests,
}


# ---------------------------------------------------------------------------- docs


def render_text(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """The text with every block and figure regenerated; and the problems met (missing JSON, ...)."""
    problems: list[str] = []

    def block(m: re.Match) -> str:
        name = m["name"]
        fn = TABLES.get(name)
        if fn is None:
            problems.append(f"block {name}: no renderer in bench/report.py")
            return m.group(0)
        try:
            body = fn(results).rstrip("\n") + "\n"
        except ReportError as e:
            problems.append(f"block {name}: {e}")
            return m.group(0)
        except (KeyError, IndexError, TypeError, ValueError) as e:  # the JSON's shape changed
            problems.append(
                f"block {name}: the JSON lacks what the table needs ({type(e).__name__}: {e})"
            )
            return m.group(0)
        return f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->"

    def fig(m: re.Match) -> str:
        file, _, dotted = m["path"].partition(":")
        try:
            value = fmt(lookup(load(file, results), dotted), m["fmt"])
        except ReportError as e:
            problems.append(f"figure {m['path']}: {e}")
            return m.group(0)
        spec = f" {m['fmt']}" if m["fmt"] else ""
        return f"<!-- fig {m['path']}{spec} -->{value}<!-- /fig -->"

    return FIG.sub(fig, BLOCK.sub(block, text)), problems


def differences(old: str, new: str) -> list[str]:
    """Human-readable mismatches: the figure or block and the stated vs the JSON value."""
    out = []
    olds = {m["path"]: m["text"] for m in FIG.finditer(old)}
    for m in FIG.finditer(new):
        if olds.get(m["path"]) != m["text"]:
            out.append(
                f"figure {m['path']}: docs say {olds.get(m['path'])!r}, JSON gives {m['text']!r}"
            )
    oldb = {m["name"]: m["body"] for m in BLOCK.finditer(old)}
    for m in BLOCK.finditer(new):
        if oldb.get(m["name"]) != m["body"]:
            a, b = (oldb.get(m["name"]) or "").splitlines(), m["body"].splitlines()
            line = next(
                (f"{x!r} vs JSON {y!r}" for x, y in zip(a, b, strict=False) if x != y),
                f"{len(a)} lines vs {len(b)}",
            )
            out.append(f"block {m['name']}: {line}")
    return out


def run(paths: list[Path], check: bool, results: Path = RESULTS) -> int:
    failed = False
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text()
        new, problems = render_text(text, results)
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for p in problems:
            print(f"{rel}: {p}", file=sys.stderr)
            failed = True
        if check:
            for d in differences(text, new):
                print(f"{rel}: {d}", file=sys.stderr)
                failed = True
        elif new != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(new)
            tmp.replace(path)
            print(f"updated {rel}")
    if check and not failed:
        print(
            f"bench.report: every figure in {len([p for p in paths if p.is_file()])} files matches its JSON"
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--check", action="store_true", help="compare, do not write; exit 1 on a mismatch"
    )
    ap.add_argument(
        "files", nargs="*", type=Path, help="Markdown files (default: README.md, docs/results.md)"
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON files")
    a = ap.parse_args(argv)
    return run([p.resolve() for p in a.files] or DOCS, a.check, a.results)


if __name__ == "__main__":
    sys.exit(main())
