"""TCAV concept tests and concept-refined search on phantoms with known artefacts.

Phantoms of 1,200 cases (seed 21, 128 px), models trained with the CLI defaults
(`casebase train MANIFEST --out M`, as the demo), indexes with `casebase index build`:

    sm  x-ray, --confounder site-marker (letter A/B/C tied to nodule/mass/cavity in train/val)
        ARTIFACTS/h20/{sm,m_sm,i_sm}
    ru  photo, --confounder ruler (ruler tied to melanoma in train/val)   ARTIFACTS/h20/…
    ru1 the same with --strength 1.0 (every train/val melanoma has the ruler, no other case)
    cl  x-ray, no confounder: the shared default-trained ARTIFACTS/depth/chest
    pc  photo, no confounder: the shared default-trained ARTIFACTS/depth/photo
    dv  photo, --confounder scanner (each class photographed with its own device, colour cast,
        vignette and blur, in train/val; melanoma with the Heine)   ARTIFACTS/h20/{dv,m_dv,i_dv}
    pcd the clean photo model (pc) against the device concept

Concept folders come from retrieval.data.phantom.write_concept_images: the site letter
A (tied to nodule) burned into cases drawn like the data, the ruler on such photos, the same
photos all taken with one device (device_Heine, tied to melanoma on dv), a control drawn
like each data set itself, and the very same cases without the artefact ("plain",
pixel-identical elsewhere; for the device, each with the device the planner drew). Parts:

  use       ground truth for the TCAV calls: what adding the artefact does to each model
            (paired artefact / plain images: change of each class's centred logit and
            probability, share of predictions that change), and on the test split (artefact
            independent of the label) P(tied class) with and without it
  variants  Kim et al.'s run-level null (the concept's runs against random-vs-random runs,
            Welch t) with CAV kind (SGD "filter" CAV / "pattern" CAV, the mean activation
            difference) x class target (raw / centred logit) x decision (TCAV-score test
            alone / also the effect) x layer: the SGD CAVs miss the marker at features.4/.5
  tcav      the library's defaults (retrieval.concepts.tcav.run_concepts: pattern CAVs,
            centred logits, set-level null) on every phantom, with the acceptance per layer
            (the tied artefact significant with TCAV > 0.5 on sm/ru, the control significant
            for no class, the artefact not significant on cl/pc), both p-values (TCAV score,
            effect); then layer_choice: per layer, phantoms passing and the agreement of the
            effects with part use (the rule that picked the default layer)
  seeds     10 seeds x fresh control sets at the default layer: how often each call comes
            out, under the library's set-level null and under Kim et al.'s run-level null
  search    marker_A/B/C (ruler) stored in a copy of the bundle; test queries (own patient
            excluded) searched before/after weight -1 (and -2): share of the top-5 with the
            query's site (ruler status), and precision@5
  timing    2 concepts x 3 classes x 20 runs on the 1,020-case sm index, wall and CPU
            (run alone with /work/notes/heavy --exclusive for the stated figure)

    /work/notes/heavy .venv/bin/python bench/concepts.py --part use,variants,tcav,search,seeds
    /work/notes/heavy --exclusive .venv/bin/python bench/concepts.py --part timing
        -> bench/results/concepts.json (parts merge; run in parallel safely)
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

ARTIFACTS = Path(os.environ.get("CASEBASE_ARTIFACTS", "/work/artifacts"))
ART = ARTIFACTS / "h20"
DEPTH = ARTIFACTS / "depth"
PHANTOMS = {
    "sm": {
        "index": ART / "i_sm",
        "manifest": ART / "sm" / "manifest.csv",
        "modality": "xray",
        "confounder": "site-marker",
        "artefact": "marker_A",
        "tied": "nodule",
        "attr": ("site", "A"),
    },
    "cl": {
        "index": DEPTH / "chest",
        "manifest": DEPTH / "chest_phantom" / "manifest.csv",
        "modality": "xray",
        "confounder": "none",
        "artefact": "marker_A",
        "tied": None,
        "attr": None,
    },
    "ru": {
        "index": ART / "i_ru",
        "manifest": ART / "ru" / "manifest.csv",
        "modality": "photo",
        "confounder": "ruler",
        "artefact": "ruler",
        "tied": "melanoma",
        "attr": ("ruler", "yes"),
    },
    "ru1": {  # the ruler on every train/val melanoma and on no other case (--strength 1.0)
        "index": ART / "i_ru1",
        "manifest": ART / "ru1" / "manifest.csv",
        "modality": "photo",
        "confounder": "ruler",
        "artefact": "ruler",
        "tied": "melanoma",
        "attr": ("ruler", "yes"),
        "strength": 1.0,
    },
    "pc": {
        "index": DEPTH / "photo",
        "manifest": DEPTH / "photo_phantom" / "manifest.csv",
        "modality": "photo",
        "confounder": "none",
        "artefact": "ruler",
        "tied": None,
        "attr": None,
    },
    # the photo's second artefact: the acquisition device (colour cast, vignette, blur) tied to
    # the class (--confounder scanner: melanoma photographed with the Heine at strength 0.9)
    "dv": {
        "index": ART / "i_dv",
        "manifest": ART / "dv" / "manifest.csv",
        "modality": "photo",
        "confounder": "scanner",
        "artefact": "device_Heine",
        "plain": "plain_ruler",  # the same cases, each with the device the planner drew
        "tied": "melanoma",
        "attr": ("device", "Heine"),
    },
    "pcd": {  # the clean photo model (pc) against the device concept
        "index": DEPTH / "photo",
        "manifest": DEPTH / "photo_phantom" / "manifest.csv",
        "modality": "photo",
        "confounder": "none",
        "artefact": "device_Heine",
        "plain": "plain_ruler",
        "tied": None,
        "attr": None,
    },
}
TIED = {
    "marker_A": "nodule",
    "marker_B": "mass",
    "marker_C": "cavity",
    "ruler": "melanoma",
    "device_DermLite": "naevus",
    "device_Heine": "melanoma",
    "device_Canfield": "keratosis",
}
DEVICES = ("DermLite", "Heine", "Canfield")
N_IMAGES = 50


def concept_dirs(n: int = N_IMAGES) -> dict[str, Path]:
    from retrieval.data.phantom import write_concept_images

    base = ART / "concepts"
    todo = {}
    for site in "ABC":
        todo[f"marker_{site}"] = ("marker", "xray", site, "none")
    todo["plain_marker_A"] = ("plain", "xray", "A", "none")
    todo["ruler"] = ("ruler", "photo", "A", "none")
    todo["plain_ruler"] = ("plain", "photo", "A", "none")
    for device in DEVICES:  # the same cases as ruler / plain_ruler, all with one device
        todo[f"device_{device}"] = ("device", "photo", "A", "none")
    strength = {}
    for key, ph in PHANTOMS.items():
        todo[f"control_{key}"] = ("control", ph["modality"], "A", ph["confounder"])
        strength[f"control_{key}"] = ph.get("strength", 0.9)
    out = {}
    for name, (kind, modality, site, conf) in todo.items():
        d = out[name] = base / name
        if d.is_dir() and len(list(d.iterdir())) >= n:
            continue
        seed = 2000 if kind == "control" else 1000
        vendor = name.removeprefix("device_") if kind == "device" else None
        write_concept_images(d, kind, modality, n=n, site=site, confounder=conf, seed=seed,
                             strength=strength.get(name, 0.9), vendor=vendor)  # fmt: skip
    return out


def _available(keys) -> dict:
    return {k: PHANTOMS[k] for k in keys if (PHANTOMS[k]["index"] / "bundle.json").is_file()}


def _load_dir(r, d: Path):
    from retrieval.concepts import sources

    return sources.load_images(r, sorted(str(p) for p in d.iterdir())).tensors


def _logits(r, x):
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(x), 64):
            f = r.model.backbone.features(x[s : s + 64])
            out.append(r.model.classifier(f.mean(dim=(2, 3))).numpy())
    return np.concatenate(out)


def part_use(dirs: dict[str, Path], keys) -> dict:
    """What adding the artefact does to each model (the ground truth for the TCAV calls)."""
    from scipy import stats

    from retrieval.service.evaluate import embed_split
    from retrieval.service.retriever import CaseRetriever

    out = {}
    for key, ph in _available(keys).items():
        r = CaseRetriever.load(ph["index"])
        art = ph["artefact"]
        la = _logits(r, _load_dir(r, dirs[art]))
        lp = _logits(r, _load_dir(r, dirs[ph.get("plain", f"plain_{art}")]))
        ca, cp = la - la.mean(1, keepdims=True), lp - lp.mean(1, keepdims=True)
        pa, pp = _softmax(la), _softmax(lp)
        row = {
            "artefact": art,
            "tied_class": ph["tied"],
            "n_pairs": len(la),
            "prediction_changed": float((la.argmax(1) != lp.argmax(1)).mean()),
            "classes": {},
        }
        for ci, c in enumerate(r.classes):
            d = ca[:, ci] - cp[:, ci]
            row["classes"][c] = {
                "delta_centred_logit": float(d.mean()),
                "delta_probability": float((pa[:, ci] - pp[:, ci]).mean()),
                "share_rising": float((d > 0).mean()),
                "p_paired_t": float(stats.ttest_1samp(d, 0.0).pvalue),
            }
        if ph["attr"] is not None:  # on the test split the artefact is independent of the label
            attr, val = ph["attr"]
            qs = embed_split(r, ph["manifest"], "test", 5, progress=False)
            p = qs.probabilities[:, r.classes.index(ph["tied"])]
            has = (qs.cases[attr].astype(str) == val).to_numpy()
            true = qs.cases["label"].astype(str).to_numpy()
            pred = np.array(r.classes)[qs.probabilities.argmax(1)]
            row["test_split"] = {
                "artefact": f"{attr}={val}",
                "accuracy": float((pred == true).mean()),
                "p_tied_with_artefact": float(p[has].mean()),
                "p_tied_without_artefact": float(p[~has].mean()),
                "n_with": int(has.sum()),
                "n_without": int((~has).sum()),
            }
        out[key] = row
        print(f"[use {key}] " + json.dumps(row))
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _layer_acceptance(key: str, data: dict, names: list[str], statistic: str | None = None) -> dict:
    """Per layer: the tied artefact significant (TCAV > 0.5) on sm/ru; the control significant
    for no class; the artefact significant for no class on the clean phantoms.

    statistic None: the library's decision; "score" / "effect": Holm over the uncorrected
    p-values of that statistic (both are in the JSON), to compare the two."""
    from retrieval.audit.concordance import holm

    ph = PHANTOMS[key]
    checks = {}
    for layer in data["layers_tested"]:
        tests = {(n, c): t for n in names
                 for c, t in data["concepts"][n]["layers"][layer]["classes"].items()}  # fmt: skip
        if statistic is None:
            sig = {k: t["significant"] for k, t in tests.items()}
        else:
            adj = holm([t[f"p_value_{statistic}"] for t in tests.values()])
            sig = {k: bool(p < 0.05) for k, p in zip(tests, adj, strict=True)}
        checks[layer] = _acceptance(names, sig, tests, ph["tied"])
    return checks


def _acceptance(names, sig: dict, tests: dict, tied: str | None) -> dict:
    """The issue's acceptance per concept: an artefact significant for its tied class with
    TCAV > 0.5; a control (or any concept on a phantom with no tie) significant for none.
    ``sig`` and ``tests`` are keyed by (concept, class)."""
    ok = {}
    for n in names:
        if n.startswith("control") or tied is None:
            ok[f"{n}: significant for no class"] = not any(v for (m, _), v in sig.items() if m == n)
        else:
            ok[f"{n}: significant for {tied} with TCAV > 0.5"] = bool(
                sig[n, tied] and tests[n, tied]["tcav_score"] > 0.5
            )
    return {
        "checks": ok,
        "all_pass": all(ok.values()),
        "significant": [f"{n}/{c}" for (n, c), v in sig.items() if v],
    }


def part_tcav(dirs: dict[str, Path], runs: int, keys) -> dict:
    from retrieval.concepts.tcav import run_concepts
    from retrieval.service.retriever import CaseRetriever

    out = {}
    for key, ph in _available(keys).items():
        r = CaseRetriever.load(ph["index"])
        names = [ph["artefact"], f"control_{key}"]
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_concepts(
            r,
            [(n, str(dirs[n])) for n in names],
            manifest=ph["manifest"],
            random_runs=runs,
            progress=False,
        )
        data = res.to_json()
        data["wall_s"] = round(time.perf_counter() - t0, 1)
        data["cpu_s"] = round(time.process_time() - c0, 1)
        data["acceptance"] = _layer_acceptance(key, data, names)
        data["acceptance_by_statistic"] = {
            st: _layer_acceptance(key, data, names, st) for st in ("score", "effect")
        }
        for n in names:  # keep the JSON readable: per-run lists only at the headline layer
            for lv in data["concepts"][n]["layers"].values():
                for target in ("classes", "similarity"):
                    for t in lv[target].values():
                        t.pop("scores", None)
                        t.pop("random_scores", None)
        out[key] = data
        print(f"[{key}] {data['wall_s']} s; pass per layer: "
              + ", ".join(f"{k}: {v['all_pass']}" for k, v in data["acceptance"].items()))  # fmt: skip
        for layer, v in data["acceptance"].items():
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


def part_search(dirs: dict[str, Path], runs: int, keys) -> dict:
    from retrieval.concepts import store
    from retrieval.concepts.tcav import run_concepts
    from retrieval.service.evaluate import embed_split
    from retrieval.service.retriever import CaseRetriever

    out = {}
    plan = {
        "sm": ("site", ["marker_A", "marker_B", "marker_C"]),
        "ru": ("ruler", ["ruler"]),
        "ru1": ("ruler", ["ruler"]),
        "dv": ("device", [f"device_{d}" for d in DEVICES]),
    }
    for key, ph in _available([k for k in keys if k in plan]).items():
        attr, names = plan[key]
        idx = ART / f"i_{key}_concepts"
        if idx.exists():
            shutil.rmtree(idx)
        shutil.copytree(ph["index"], idx)
        r = CaseRetriever.load(idx)
        res = run_concepts(
            r,
            [(n, str(dirs[n])) for n in names],
            manifest=ph["manifest"],
            random_runs=runs,
            progress=False,
        )
        store.store(idx, res)
        r = CaseRetriever.load(idx)  # verifies the bundle with the stored concepts
        qs = embed_split(r, ph["manifest"], "test", 5, progress=False)
        dirs_emb = store.load_directions(idx)
        before = _share_and_precision(r, qs, qs.vectors, attr)
        rows = {"before": {"share_same_" + attr: before[0], "precision_at_5": before[1]}}
        for w in (-1.0, -2.0):
            moved = store.refine(qs.vectors, dirs_emb, dict.fromkeys(names, w))
            after = _share_and_precision(r, qs, moved, attr)
            rows[f"weight_{w:g}"] = {"share_same_" + attr: after[0], "precision_at_5": after[1]}
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


def part_timing(dirs: dict[str, Path], runs: int, keys) -> dict:
    from retrieval.concepts.tcav import DEFAULT_LAYER, run_concepts
    from retrieval.service.retriever import CaseRetriever

    ph = PHANTOMS["sm"]
    if not (ph["index"] / "bundle.json").is_file():
        return {"missing": str(ph["index"])}
    r = CaseRetriever.load(ph["index"])
    out = {"n_indexed": int(r.index.ntotal), "index": "sm"}
    for label, layers in (("default_layer", [DEFAULT_LAYER]), ("all_candidate_layers", None)):
        load0 = list(os.getloadavg())
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_concepts(
            r,
            [("marker_A", str(dirs["marker_A"])), ("control", str(dirs["control_sm"]))],
            manifest=ph["manifest"],
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
            "torch_threads": __import__("torch").get_num_threads(),
            "stages_s": res.timings,
            "concepts": 2,
            "classes": len(res.classes),
            "random_runs": runs,
        }
        print(f"[timing {label}] " + json.dumps(out[label]))
    return out


def _grads(model, index: int, x, ci: int):
    """Per-input gradients at block `index` of the class-ci logit and of the centred logit."""
    import torch

    feats = model.backbone.features
    g_raw, g_cen = [], []
    for s in range(0, len(x), 32):
        with torch.no_grad():
            a = feats[: index + 1](x[s : s + 32])
        a = a.detach().requires_grad_(True)
        lg = model.classifier(feats[index + 1 :](a).mean(dim=(2, 3)))
        (g1,) = torch.autograd.grad(lg[:, ci].sum(), a, retain_graph=True)
        (g2,) = torch.autograd.grad((lg[:, ci] - lg.mean(1)).sum(), a)
        g_raw.append(g1.flatten(1).numpy())
        g_cen.append(g2.flatten(1).numpy())
    return {"logit": np.concatenate(g_raw), "centred": np.concatenate(g_cen)}


def part_variants(dirs: dict[str, Path], runs: int, keys, seed: int = 0) -> dict:
    """Which test to trust, chosen on all four phantoms at once (see the module doc).

    Per run r: positives = a fresh half of the concept's images (or a fresh random set for
    the null), negatives = a fresh random set. Directions: "filter" = the SGD CAV (unit),
    "pattern" = mean(positives) - mean(negatives) (the signal direction). Per class input x
    and direction v: TCAV sign of g(x)·v; effect = mean_x g(x)·d, with d the concept's mean
    activation shift along v (pattern: d itself; filter: ((mu+ - mu-)·v) v), in logit units:
    the first-order change of the class score from the random images to the concept's.
    Decisions: "score" = Welch t of the runs' TCAV scores vs the null's (Kim et al.), Holm over
    concepts x classes; "score+effect" = that and the same test on the effects.
    """
    from scipy import stats

    from retrieval.audit.concordance import holm
    from retrieval.concepts import cav as cavs
    from retrieval.concepts import sources
    from retrieval.service.retriever import CaseRetriever

    out = {}
    for key, ph in _available(keys).items():
        rng = np.random.default_rng(seed)
        r = CaseRetriever.load(ph["index"])
        model = r.model
        names = [ph["artefact"], f"control_{key}"]
        pool = sources.image_pool(r, ph["manifest"])
        test = pool[pool["split"].astype(str) == "test"]
        xr = sources.load_images(
            r, sources.sample(pool["image"].astype(str).tolist(), 4 * N_IMAGES, rng)
        ).tensors
        inputs = {}
        for c in r.classes:
            paths = test[test["label"].astype(str) == c]["image"].astype(str).tolist()
            inputs[c] = sources.load_images(r, sources.sample(paths, 50, rng)).tensors
        xs = {n: _load_dir(r, dirs[n]) for n in names}
        layers = [int(n.rsplit(".", 1)[1]) for n in cavs.candidate_layers(model)]
        acts_r = cavs.activations(model, layers, xr)
        acts = {n: cavs.activations(model, layers, x) for n, x in xs.items()}
        m = N_IMAGES // 2
        res_key = {}
        for i in layers:
            grads = {c: _grads(model, i, inputs[c], ci) for ci, c in enumerate(r.classes)}
            runs_dirs = {k: {n: [] for n in ["null", *names]} for k in ("filter", "pattern")}
            shifts = {k: {n: [] for n in ["null", *names]} for k in ("filter", "pattern")}
            acc = {n: [] for n in names}
            for run in range(runs):
                perm = rng.permutation(len(xr))
                neg = acts_r[i][perm[m : 2 * m]]
                sets = {"null": acts_r[i][perm[:m]]}
                for n in names:
                    sets[n] = acts[n][i][rng.permutation(len(acts[n][i]))[:m]]
                for n, pos in sets.items():
                    cv = cavs.fit_cav(pos, neg, seed + run)
                    if n != "null":
                        acc[n].append(cv.accuracy)
                    d = (pos.mean(0) - neg.mean(0)).astype(np.float64)
                    v = cv.direction.astype(np.float64)
                    runs_dirs["filter"][n].append(v)
                    shifts["filter"][n].append((d @ v) * v)
                    runs_dirs["pattern"][n].append(d / max(np.linalg.norm(d), 1e-12))
                    shifts["pattern"][n].append(d)
            layer_out = {"cav_accuracy": {n: float(np.mean(a)) for n, a in acc.items()}}
            for kind in ("filter", "pattern"):
                for target in ("logit", "centred"):
                    tests = {}
                    for n in names:
                        for c in r.classes:
                            g = grads[c][target]
                            sc = {
                                k: (g @ np.stack(runs_dirs[kind][k]).T > 0).mean(0)
                                for k in ("null", n)
                            }
                            ef = {k: (g @ np.stack(shifts[kind][k]).T).mean(0) for k in ("null", n)}
                            p_s = stats.ttest_ind(sc[n], sc["null"], equal_var=False).pvalue
                            p_e = stats.ttest_ind(ef[n], ef["null"], equal_var=False).pvalue
                            tests[n, c] = {
                                "tcav_score": float(sc[n].mean()),
                                "random_mean": float(sc["null"].mean()),
                                "random_std": float(sc["null"].std()),
                                "effect": float(ef[n].mean()),
                                "effect_random_std": float(ef["null"].std()),
                                "p_score": 1.0 if not np.isfinite(p_s) else float(p_s),
                                "p_effect": 1.0 if not np.isfinite(p_e) else float(p_e),
                            }
                    flat = list(tests)
                    hs = holm([tests[k]["p_score"] for k in flat])
                    he = holm([tests[k]["p_effect"] for k in flat])
                    for k, a, b in zip(flat, hs, he, strict=True):
                        tests[k]["p_score_holm"], tests[k]["p_effect_holm"] = a, b
                    for decision in ("score", "score+effect"):
                        v = f"{kind}/{target}/{decision}"
                        sig = {
                            k: t["p_score_holm"] < 0.05
                            and (decision == "score" or t["p_effect_holm"] < 0.05)
                            for k, t in tests.items()
                        }
                        layer_out[v] = _acceptance(names, sig, tests, ph["tied"])
                    layer_out[f"{kind}/{target}/tests"] = {
                        f"{n}/{c}": t for (n, c), t in tests.items()
                    }
            res_key[f"{cavs.PREFIX}{i}"] = layer_out
            print(f"[variants {key}] layer {i}: "
                  + ", ".join(f"{v}={'PASS' if o['all_pass'] else 'fail'}"
                              for v, o in layer_out.items() if isinstance(o, dict) and "all_pass" in o))  # fmt: skip
        out[key] = res_key
    # the summary: per variant and layer, how many phantoms pass every check
    summary: dict = {}
    for key, per_layer in out.items():
        for layer, lo in per_layer.items():
            for v, o in lo.items():
                if isinstance(o, dict) and "all_pass" in o:
                    s = summary.setdefault(f"{v} @ {layer}", {"pass": [], "fail": []})
                    s["pass" if o["all_pass"] else "fail"].append(key)
    out["summary"] = summary
    for k, s in sorted(summary.items(), key=lambda kv: -len(kv[1]["pass"])):
        print(f"  {k:<50} pass {','.join(s['pass']) or '-'}  fail {','.join(s['fail']) or '-'}")
    return out


def part_seeds(runs: int, keys, n_seeds: int = 10) -> dict:
    """How often each call comes out over seeds, at the default layer: seed j draws a fresh
    control set (generator seed 2000 + j) and runs the test with seed j (random pool, class
    inputs, runs). The controls' rate of 'significant for some class' is the test's false
    positive rate (Holm at 0.05 over 2 concepts x 3 classes: at most 0.05 if calibrated).
    Both nulls: "set" (the library's: random sets of the concept's size) and "runs" (Kim et
    al.'s: the concept's runs against random-vs-random runs, Welch t on the effects); and
    "similarity": the library's test on the similarity to each class's cases."""
    from retrieval.audit.concordance import holm
    from retrieval.concepts.tcav import DEFAULT_LAYER, run_concepts
    from retrieval.data.phantom import write_concept_images
    from retrieval.service.retriever import CaseRetriever

    dirs = concept_dirs()
    out = {"layer": DEFAULT_LAYER, "n_seeds": n_seeds}
    for key, ph in _available(keys).items():
        r = CaseRetriever.load(ph["index"])
        rows = []
        for j in range(n_seeds):
            ctl = ART / "concepts" / "seeds" / f"control_{key}_{j}"
            if not (ctl.is_dir() and len(list(ctl.iterdir())) >= N_IMAGES):
                write_concept_images(ctl, "control", ph["modality"], n=N_IMAGES,
                                     confounder=ph["confounder"], seed=2000 + j,
                                     strength=ph.get("strength", 0.9))  # fmt: skip
            art = ph["artefact"]
            res = run_concepts(
                r,
                [(art, str(dirs[art])), ("control", str(ctl))],
                manifest=ph["manifest"],
                layers=[DEFAULT_LAYER],
                random_runs=runs,
                seed=j,
                progress=False,
            ).to_json()
            row = {}
            for design, key_p in (("set", None), ("runs", "p_value_runs")):
                tests = {(n, c): t for n in (art, "control")
                         for c, t in res["concepts"][n]["classes"].items()}  # fmt: skip
                if key_p is None:
                    sig = {k: t["significant"] for k, t in tests.items()}
                else:
                    adj = holm([t[key_p] for t in tests.values()])
                    sig = {k: bool(p < 0.05) for k, p in zip(tests, adj, strict=True)}
                row[design] = {
                    n: {c: sig[m, c] for (m, c) in tests if m == n} for n in (art, "control")
                }
            row["similarity"] = {
                n: {c: t["significant"] for c, t in res["concepts"][n]["similarity"].items()}
                for n in (art, "control")
            }
            rows.append(row)
        art = ph["artefact"]
        summ = {}
        for design in ("set", "runs", "similarity"):
            xs = [x[design] for x in rows]
            s = {
                "control_any_significant": sum(any(x["control"].values()) for x in xs) / n_seeds,
                "artefact_any_significant": sum(any(x[art].values()) for x in xs) / n_seeds,
            }
            if ph["tied"]:
                s["artefact_tied_significant"] = sum(x[art][ph["tied"]] for x in xs) / n_seeds
            summ[design] = s
        out[key] = {"summary": summ, "runs": rows}
        print(f"[seeds {key}] " + json.dumps(summ))
    return out


PARTS = ("use", "variants", "tcav", "search", "timing", "layer_choice", "seeds")


def layer_choice(tcav: dict, use: dict) -> dict:
    """Per layer: on how many phantoms the acceptance holds, and how well the artefact
    concepts' effects agree with pasting the artefact in (correlation and sign agreement with
    the change of the centred logit, over phantoms x classes). The rule: most phantoms
    passing, ties broken by the correlation."""
    out = {}
    keys = [k for k, v in tcav.items() if isinstance(v, dict) and "concepts" in v and k in use]
    layers = tcav[keys[0]]["layers_tested"] if keys else []
    for layer in layers:
        eff, truth = [], []
        for k in keys:
            art = use[k]["artefact"]
            for c, t in tcav[k]["concepts"][art]["layers"][layer]["classes"].items():
                eff.append(t["effect"])
                truth.append(use[k]["classes"][c]["delta_centred_logit"])
        e, g = np.array(eff), np.array(truth)
        out[layer] = {
            "phantoms_passing": [k for k in keys if tcav[k]["acceptance"][layer]["all_pass"]],
            "effect_vs_pasting_r": float(np.corrcoef(e, g)[0, 1]) if len(e) > 2 else None,
            "sign_agreement": f"{int((np.sign(e) == np.sign(g)).sum())}/{len(e)}",
        }
    if out:
        best = max(
            out,
            key=lambda L: (len(out[L]["phantoms_passing"]), out[L]["effect_vs_pasting_r"] or -1),
        )
        out["chosen"] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", help=f"all, or a comma list of {', '.join(PARTS)}")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", default=None, help="phantoms, e.g. sm,cl (default: all)")
    args = ap.parse_args()
    started = time.time()
    info = machine()
    dirs = concept_dirs()
    keys = args.only.split(",") if args.only else list(PHANTOMS)
    path = RESULTS / "concepts.json"
    payload = _previous(path)  # parts run at different times keep each other's results
    parts = ["use", "variants", "tcav", "search"] if args.part == "all" else args.part.split(",")
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part {bad[0]!r}")
    for p in parts:
        fn = {
            "use": lambda: part_use(dirs, keys),
            "variants": lambda: part_variants(dirs, args.runs, keys),
            "tcav": lambda: part_tcav(dirs, args.runs, keys),
            "search": lambda: part_search(dirs, args.runs, keys),
            "timing": lambda: part_timing(dirs, args.runs, keys),
            "seeds": lambda: part_seeds(args.runs, keys),
        }[p]
        new = fn()
        if p == "timing":
            payload[p] = new
        else:  # per phantom, kept from earlier runs when not run again
            kept = {k: v for k, v in _previous(path).get(p, {}).items() if k in PHANTOMS}
            kept.update(new)
            payload[p] = kept
        payload[p]["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        payload[p]["loadavg_end"] = list(os.getloadavg())
    if "tcav" in parts or "use" in parts:
        both = {**_previous(path), **payload}
        if "tcav" in both and "use" in both:
            payload["layer_choice"] = layer_choice(both["tcav"], both["use"])
            parts = [*parts, "layer_choice"]
    fresh = {p: payload[p] for p in parts}
    lock_path = Path(os.environ.get("TMPDIR", "/tmp")) / "casebase-bench-concepts.lock"
    with open(lock_path, "w") as lock:  # parts run in parallel keep each other's
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = _previous(path)
        payload.update(fresh)
        _write(path, info, payload, started)


def _previous(path: Path) -> dict:
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("setup", {}).get("version") != 2:
        return {}
    return {k: old[k] for k in PARTS if k in old}


def _write(path: Path, info: dict, payload: dict, started: float) -> None:
    payload["setup"] = {
        "version": 2,
        "phantoms": {
            k: {"index": str(v["index"]), "confounder": v["confounder"], "tied": v["tied"]}
            for k, v in PHANTOMS.items()
        },
        "models": "CLI defaults (casebase train MANIFEST --out M: 128 px, compact width 16, "
        "epochs sized to the data), 1,200-case phantoms, seed 21",
        "concept_images": N_IMAGES,
        "tied_classes": TIED,
    }
    finish("concepts", info, payload, started)


if __name__ == "__main__":
    main()
