"""Concepts in the shortcut audit: an artefact concept (ruler, marker, burned-in text)
that is significant for a class, at the headline layer, on the class logit or on the
similarity to the class's cases, with the score rising along it, is a shortcut finding.
Significant with the score *falling* along it is not a shortcut for that class, but it
is still evidence that the artefact moves the model (e.g. "the ruler lowers naevus"
when a ruler was tied to melanoma), so it is reported as an influence, not dropped."""

from __future__ import annotations

from retrieval.concepts.tcav import run_concepts


def _findings(concepts_json: dict, rising: bool) -> list[dict]:
    out = []
    for name, v in concepts_json.get("concepts", {}).items():
        for target in ("classes", "similarity"):
            for c, t in (v.get(target) or {}).items():
                rises = t.get("rises", t["tcav_score"] > t["random_mean"])
                if not t["significant"] or rises != rising:
                    continue
                what = "logit" if target == "classes" else "similarity to the class's cases"
                evidence = (
                    f"for {t['tcav_score']:.0%} of {c} cases (random image sets "
                    f"{t['random_mean']:.0%} ± {t['random_std']:.0%}, corrected "
                    f"p = {t['p_value']:.2g})."
                )
                text = (
                    f"{name} is a shortcut for {c}: its {what} rises along {name} {evidence}"
                    if rising
                    else f"{name} moves the model away from {c}: its {what} rises along "
                    f"{name} only {evidence} The artefact influences the answer."
                )
                out.append(
                    {
                        "concept": name,
                        "target": target,
                        "class": c,
                        "layer": v["layer"],
                        "direction": "rises" if rising else "falls",
                        "tcav_score": t["tcav_score"],
                        "random_mean": t["random_mean"],
                        "random_std": t["random_std"],
                        "p_value": t["p_value"],
                        "text": text,
                    }
                )
    return out


def shortcuts(concepts_json: dict) -> list[dict]:
    """The evidence of each concept shortcut (significant, score rising along the concept):
    concept, target, class, score vs random, p."""
    return _findings(concepts_json, rising=True)


def influences(concepts_json: dict) -> list[dict]:
    """Significant concepts along which a class's score falls: the artefact moves the model
    away from that class. Same keys as :func:`shortcuts`, ``direction`` "falls"."""
    return _findings(concepts_json, rising=False)


def audit_concepts(r, manifest, concepts: list[tuple[str, str]], seed: int = 0, progress=True):
    """(the concepts JSON with its "shortcuts", example image paths per concept)."""
    res = run_concepts(r, concepts, manifest=manifest, seed=seed, progress=progress)
    data = res.to_json()
    data["shortcuts"] = shortcuts(data)
    data["influences"] = influences(data)
    return data, {n: c.examples for n, c in res.concepts.items()}
