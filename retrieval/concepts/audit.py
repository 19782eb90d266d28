"""Concepts in the shortcut audit: an artefact concept (ruler, marker, burned-in text)
that is significant for a class, at the headline layer, on the class logit or on the
similarity to the class's cases, with the score rising along it, is a shortcut finding."""

from __future__ import annotations

from retrieval.concepts.tcav import run_concepts


def shortcuts(concepts_json: dict) -> list[dict]:
    """The evidence of each concept shortcut: concept, target, class, score vs random, p."""
    out = []
    for name, v in concepts_json.get("concepts", {}).items():
        for target in ("classes", "similarity"):
            for c, t in (v.get(target) or {}).items():
                if t["significant"] and t.get("rises", t["tcav_score"] > t["random_mean"]):
                    what = "logit" if target == "classes" else "similarity to the class's cases"
                    out.append(
                        {
                            "concept": name,
                            "target": target,
                            "class": c,
                            "layer": v["layer"],
                            "tcav_score": t["tcav_score"],
                            "random_mean": t["random_mean"],
                            "random_std": t["random_std"],
                            "p_value": t["p_value"],
                            "text": (
                                f"{name} is a shortcut for {c}: its {what} rises along {name} "
                                f"for {t['tcav_score']:.0%} of {c} cases (random image sets "
                                f"{t['random_mean']:.0%} ± {t['random_std']:.0%}, corrected "
                                f"p = {t['p_value']:.2g})."
                            ),
                        }
                    )
    return out


def audit_concepts(r, manifest, concepts: list[tuple[str, str]], seed: int = 0, progress=True):
    """(the concepts JSON with its "shortcuts", example image paths per concept)."""
    res = run_concepts(r, concepts, manifest=manifest, seed=seed, progress=progress)
    data = res.to_json()
    data["shortcuts"] = shortcuts(data)
    return data, {n: c.examples for n, c in res.concepts.items()}
