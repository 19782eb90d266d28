"""TCAV concept tests and concept-refined search on phantoms with known artefacts.

Phantoms (600 cases, `casebase phantom`), models trained with `casebase train
--epochs 5 --image-size 64` (the 2 shared cores), indexes with `casebase index build`,
all under ARTIFACTS (outside git):

    sm  x-ray, --confounder site-marker (letter A/B/C tied to nodule/mass/cavity in train/val)
    cl  x-ray, no confounder
    ru  photo, --confounder ruler (ruler tied to melanoma in train/val)
    pc  photo, no confounder

Concept folders come from retrieval.data.phantom.write_concept_images: the site
letter burned into cases drawn like the data (marker_A/B/C; lesions of every class),
the ruler on such photos, and a control drawn like each data set itself. Parts:

  tcav     every concept x class x candidate layer, 20 random runs; acceptance per layer:
           the tied marker/ruler significant with TCAV > 0.5 on sm/ru, the control
           significant for no class, the artefact not significant on cl/pc
  tcav_bg  the literal "marker on background alone" (no lesion) on sm, all three letters:
           against random data images this concept also carries "no lesion"
  search   marker_A/B/C (ruler) stored in a copy of the bundle; test queries (own patient
           excluded) searched before/after weight -1 (and -2): share of the top-5 with the
           query's site (ruler status), and precision@5
  timing   2 concepts x 3 classes x 20 runs on the ~1k-case index (i_sm1k), wall and CPU

    nice -n 5 python bench/concepts.py --part all      -> bench/results/concepts.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, finish, machine

ART = Path(os.environ.get("CASEBASE_H7", "/work/artifacts/h7"))
TIED = {"marker_A": "nodule", "marker_B": "mass", "marker_C": "cavity", "ruler": "melanoma"}
TIED.update({f"bg_{k}": v for k, v in TIED.items()})
SETS = {
    "sm": ("xray", "site-marker", ["marker_A"]),
    "cl": ("xray", "none", ["marker_A"]),
    "ru": ("photo", "ruler", ["ruler"]),
    "pc": ("photo", "none", ["ruler"]),
}
# the literal "marker on background alone" (no lesion): measured to show why the default
# concept images carry lesions like the data (see the module doc)
SETS_BG = {"sm": ("xray", "site-marker", ["bg_marker_A", "bg_marker_B", "bg_marker_C"])}


def concept_dirs(n: int = 50) -> dict[str, Path]:
    from retrieval.data.phantom import write_concept_images

    out = {}
    base = ART / "concepts"
    for site in "ABC":
        out[f"marker_{site}"] = base / f"marker_{site}"
        out[f"bg_marker_{site}"] = base / f"bg_marker_{site}"
    out["ruler"] = base / "ruler"
    for key in SETS:
        out[f"control_{key}"] = base / f"control_{key}"
    for name, d in out.items():
        if d.is_dir() and len(list(d.iterdir())) >= n:
            continue
        if name.startswith(("marker_", "bg_marker_")):
            bg = name.startswith("bg_")
            write_concept_images(d, "marker", "xray", n=n, site=name[-1], background_only=bg)
        elif name == "ruler":
            write_concept_images(d, "ruler", "photo", n=n)
        else:
            modality, conf, _ = SETS[name.split("_")[1]]
            write_concept_images(d, "control", modality, n=n, confounder=conf, seed=2000)
    return out


def part_tcav(dirs: dict[str, Path], runs: int, sets: dict | None = None) -> dict:
    from retrieval.concepts.tcav import run_concepts
    from retrieval.service.retriever import CaseRetriever

    out = {}
    for key, (_, _, artefacts) in (sets or SETS).items():
        idx = ART / f"i_{key}"
        if not (idx / "bundle.json").is_file():
            out[key] = {"missing": str(idx)}
            continue
        r = CaseRetriever.load(idx)
        names = [*artefacts, f"control_{key}"]
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_concepts(
            r,
            [(n, str(dirs[n])) for n in names],
            manifest=ART / key / "manifest.csv",
            random_runs=runs,
            progress=False,
        )
        data = res.to_json()
        data["wall_s"] = round(time.perf_counter() - t0, 1)
        data["cpu_s"] = round(time.process_time() - c0, 1)
        confounded = key in ("sm", "ru")
        checks = {}
        for layer in data["layers_tested"]:
            ok = {}
            for n in names:
                lv = data["concepts"][n]["layers"][layer]
                sig = [c for c, t in lv["classes"].items() if t["significant"]]
                if n.startswith("control"):
                    ok[f"{n}: significant for no class"] = not sig
                elif confounded:
                    t = lv["classes"][TIED[n]]
                    ok[f"{n}: significant for {TIED[n]} with TCAV > 0.5"] = bool(
                        t["significant"] and t["tcav_score"] > 0.5
                    )
                else:
                    ok[f"{n}: significant for no class"] = not sig
            checks[layer] = {"checks": ok, "all_pass": all(ok.values())}
        data["acceptance"] = checks
        for (
            n
        ) in names:  # keep the JSON readable: the per-run lists stay for the headline layer only
            for lv in data["concepts"][n]["layers"].values():
                for target in ("classes", "similarity"):
                    for t in lv[target].values():
                        t.pop("scores", None)
                        t.pop("random_scores", None)
        out[key] = data
        print(f"[{key}] {data['wall_s']} s; pass per layer: "
              + ", ".join(f"{k}: {v['all_pass']}" for k, v in checks.items()))  # fmt: skip
        for layer, v in checks.items():
            for text, passed in v["checks"].items():
                print(f"    {layer:<22} {'PASS' if passed else 'FAIL'}  {text}")
    return out


def _share_and_precision(r, qs, vecs, attr: str):
    hits = r.search(vecs, 5, exclude_patients=qs.cases["patient_id"].tolist())
    q_attr = qs.cases[attr].astype(str).to_numpy()
    q_lab = qs.cases["label"].astype(str).to_numpy()
    idx_attr = r.cases[attr].astype(str).to_numpy()
    idx_lab = r.cases["label"].astype(str).to_numpy()
    share = np.mean([np.mean([idx_attr[j] == q_attr[i] for _, j in h]) for i, h in enumerate(hits)])
    p5 = np.mean([np.mean([idx_lab[j] == q_lab[i] for _, j in h]) for i, h in enumerate(hits)])
    return float(share), float(p5)


def part_search(dirs: dict[str, Path], runs: int) -> dict:
    from retrieval.concepts import store
    from retrieval.concepts.tcav import run_concepts
    from retrieval.service.evaluate import embed_split
    from retrieval.service.retriever import CaseRetriever

    out = {}
    for key, attr, names in (("sm", "site", ["marker_A", "marker_B", "marker_C"]),
                             ("ru", "ruler", ["ruler"])):  # fmt: skip
        src = ART / f"i_{key}"
        if not (src / "bundle.json").is_file():
            out[key] = {"missing": str(src)}
            continue
        idx = ART / f"i_{key}_concepts"
        if idx.exists():
            shutil.rmtree(idx)
        shutil.copytree(src, idx)
        r = CaseRetriever.load(idx)
        res = run_concepts(
            r,
            [(n, str(dirs[n])) for n in names],
            manifest=ART / key / "manifest.csv",
            random_runs=runs,
            progress=False,
        )
        store.store(idx, res)
        r = CaseRetriever.load(idx)  # verifies the bundle with the stored concepts
        qs = embed_split(r, ART / key / "manifest.csv", "test", 5, progress=False)
        dirs_emb = store.load_directions(idx)
        before = _share_and_precision(r, qs, qs.vectors, attr)
        rows = {"before": {"share_same_" + attr: before[0], "precision_at_5": before[1]}}
        for w in (-1.0, -2.0):
            moved = store.refine(qs.vectors, dirs_emb, dict.fromkeys(names, w))
            after = _share_and_precision(r, qs, moved, attr)
            rows[f"weight_{w:g}"] = {"share_same_" + attr: after[0], "precision_at_5": after[1]}
        if key == "sm":
            for n in names:  # one letter at a time
                moved = store.refine(qs.vectors, dirs_emb, {n: -1.0})
                after = _share_and_precision(r, qs, moved, attr)
                rows[f"{n}_only_-1"] = {"share_same_" + attr: after[0], "precision_at_5": after[1]}
        # chance: the share expected if neighbours' values were independent of the query's
        q = qs.cases[attr].astype(str).value_counts(normalize=True)
        ix = r.cases[attr].astype(str).value_counts(normalize=True)
        rows["chance_share"] = float(sum(q.get(v, 0) * ix.get(v, 0) for v in q.index))
        rows["n_queries"] = len(qs.cases)
        rows["concepts"] = names
        rows["embedding_accuracy"] = {n: res.concepts[n].embedding_accuracy for n in names}
        out[key] = rows
        print(f"[search {key}] " + json.dumps(rows))
    return out


def part_timing(dirs: dict[str, Path], runs: int) -> dict:
    from retrieval.concepts.tcav import DEFAULT_LAYER, run_concepts
    from retrieval.service.retriever import CaseRetriever

    idx = ART / "i_sm1k"
    if not (idx / "bundle.json").is_file():
        return {"missing": str(idx)}
    r = CaseRetriever.load(idx)
    out = {"n_indexed": int(r.index.ntotal)}
    for label, layers in (("default_layer", [DEFAULT_LAYER]), ("all_candidate_layers", None)):
        load0 = list(os.getloadavg())
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_concepts(
            r,
            [("marker_A", str(dirs["marker_A"])), ("control", str(dirs["control_sm"]))],
            layers=layers,
            random_runs=runs,
            progress=False,
        )
        out[label] = {
            "layers": res.layers,
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "loadavg_before": load0,
            "loadavg_after": list(os.getloadavg()),
            "stages_s": res.timings,
            "concepts": 2,
            "classes": len(res.classes),
            "random_runs": runs,
        }
        print(f"[timing {label}] " + json.dumps(out[label]))
    return out


def part_use() -> dict:
    """Does the model use the artefact at all? On the test split (artefact independent of the
    label): mean predicted probability of the tied class with and without the artefact."""
    from retrieval.service.evaluate import embed_split
    from retrieval.service.retriever import CaseRetriever

    out = {}
    for key, attr, val, cls in (("sm", "site", "A", "nodule"), ("ru", "ruler", "yes", "melanoma")):
        idx = ART / f"i_{key}"
        if not (idx / "bundle.json").is_file():
            out[key] = {"missing": str(idx)}
            continue
        r = CaseRetriever.load(idx)
        qs = embed_split(r, ART / key / "manifest.csv", "test", 5, progress=False)
        p = qs.probabilities[:, r.classes.index(cls)]
        has = (qs.cases[attr].astype(str) == val).to_numpy()
        true = qs.cases["label"].astype(str).to_numpy()
        pred = np.array(r.classes)[qs.probabilities.argmax(1)]
        out[key] = {
            "artefact": f"{attr}={val}",
            "tied_class": cls,
            "test_accuracy": float((pred == true).mean()),
            "p_tied_with_artefact": float(p[has].mean()),
            "p_tied_without_artefact": float(p[~has].mean()),
            "n_with": int(has.sum()),
            "n_without": int((~has).sum()),
        }
        print(f"[use {key}] " + json.dumps(out[key]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part", choices=["tcav", "tcav_bg", "search", "timing", "use", "all"], default="all"
    )
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", default=None, help="phantoms of the tcav part, e.g. sm,cl")
    args = ap.parse_args()
    started = time.time()
    info = machine()
    dirs = concept_dirs()
    path = RESULTS / "concepts.json"
    payload = {}
    if path.is_file():  # parts run at different times keep each other's results
        old = json.loads(path.read_text())
        keep = ("tcav", "tcav_bg", "search", "timing", "use")
        payload = {k: old[k] for k in keep if k in old}
    parts = ["tcav", "use", "search", "timing"] if args.part == "all" else [args.part]
    for p in parts:
        if p == "tcav_bg":
            payload[p] = part_tcav(dirs, args.runs, SETS_BG)
        elif p == "use":
            payload[p] = part_use()
        elif p == "tcav":  # per phantom, kept from earlier runs when not run again
            keys = args.only.split(",") if args.only else list(SETS)
            new = part_tcav(dirs, args.runs, {k: SETS[k] for k in keys})
            kept = {k: v for k, v in payload.get("tcav", {}).items() if k in SETS}
            kept.update({k: v for k, v in new.items() if "missing" not in v or k not in kept})
            payload[p] = kept
        else:
            payload[p] = {"tcav": part_tcav, "search": part_search, "timing": part_timing}[p](
                dirs, args.runs
            )
        payload[p]["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload["setup"] = {
        "phantoms": "600 cases each, 128 px; models: casebase train --epochs 5 --image-size 64",
        "concept_images": 50,
        "random_runs": args.runs,
        "tied_classes": TIED,
    }
    finish("concepts", info, payload, started)


if __name__ == "__main__":
    main()
