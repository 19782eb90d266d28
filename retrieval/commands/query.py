"""`casebase query INDEX_DIR IMAGE [-k K] [--explain m1,m2] [--json] [--save-maps DIR]`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from retrieval import atomic
from retrieval.data.imageio import load_note
from retrieval.errors import CasebaseError
from retrieval.service import refine
from retrieval.service.retriever import CaseRetriever


def _filters(items: list[str]) -> dict:
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise CasebaseError(f"--filter {item!r}: use ATTR=VALUE")
        key, value = item.split("=", 1)
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def save_maps(result, out_dir: str | Path, image=None) -> dict[str, str]:
    """Each query map as .npy (H×W float32, original size) plus an overlay PNG.

    A volume's maps are .npy of its (D, H, W); the PNG overlays the slice holding the most
    of the map's positive mass (``image``: the volume as a LoadedImage, pixels (D, H, W, 1))."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for method, heat in result.maps.items():
        arr = np.nan_to_num(np.asarray(heat, np.float32))
        p = out / f"{method}.npy"
        import io

        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic.write_bytes(p, buf.getvalue())
        paths[method] = str(p)
        if image is not None:
            from retrieval.explain.overlay import best_slice, overlay_png

            pixels, heat2d = image.pixels, arr
            if arr.ndim == 3 and pixels.ndim == 4 and pixels.shape[0] == arr.shape[0]:
                k = best_slice(arr)  # the slice the audit's volume panels show too
                pixels, heat2d = pixels[k], arr[k]
            if heat2d.ndim == 2 and pixels.ndim == 3:
                atomic.write_bytes(out / f"{method}.png", overlay_png(pixels, heat2d))
    return paths


def _dicom_out(args, src, result) -> dict:
    """--dicom-sr OUT.dcm [--stow URL]: the answer as a DICOM SR + parametric maps (dicom_out)."""
    out = getattr(args, "dicom_sr", None)
    url = getattr(args, "stow", None)
    if url and not out:
        raise CasebaseError("--stow needs --dicom-sr OUT.dcm (the objects to store)")
    if not out:
        return {}
    from retrieval.data import dicom_out

    datasets = dicom_out.load_query_datasets(src)
    sr = dicom_out.build_sr(result, datasets)
    maps = dicom_out.build_parametric_maps(result.maps, datasets)
    written = dicom_out.write_objects(sr, maps, out)
    info = {
        "sr": str(written[0]),
        "maps": [str(p) for p in written[1:]],
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
    }
    lines = [f"DICOM SR: {written[0]}" + (f" (+ {len(maps)} parametric maps)" if maps else "")]
    if url:
        from retrieval.data.dicomweb import sanitize_url

        info["stored"] = dicom_out.stow(url, [sr, *maps])
        lines.append(f"stored {info['stored']} DICOM objects at {sanitize_url(url)}")
    info["lines"] = lines
    return info


def _concept_weights(items) -> dict:
    """--concept NAME=WEIGHT (repeatable) -> {"concepts": {name: weight}}; {} when not given."""
    if not items:
        return {}
    from retrieval.concepts.store import parse_weights

    return {"concepts": parse_weights(items)}


def probabilities_line(pred) -> str:
    """The class probabilities the headline quotes (calibrated when the index has a
    temperature), labelled as such, with the model's own softmax beside them when they differ."""

    def fmt(d):
        return ", ".join(f"{k} {v:.2f}" for k, v in d.items())

    if pred.calibrated_probabilities is None:
        return f"probabilities (model softmax): {fmt(pred.probabilities)}"
    t = pred.temperature
    line = f"probabilities (calibrated{'' if t is None else f', T = {t:.3g}'}): "
    line += fmt(pred.calibrated_probabilities)
    if t is None or t != 1.0:
        line += f"; model softmax: {fmt(pred.probabilities)}"
    return line


def self_match_line(found) -> str:
    """One line saying the query is an indexed case itself (JSON: self_match)."""
    sim = "" if found.similarity is None else f", cosine {found.similarity:.4f}"
    where = "left out of the neighbours" if found.excluded else "it is among the neighbours"
    return f"note: the query is indexed case {found.case_id} itself ({found.reason}{sim}); {where}"


def run(args) -> int:
    if args.k < 1:
        raise CasebaseError("-k must be at least 1")
    r = CaseRetriever.load(args.index_dir, device=args.device)
    r.set_reference_class(getattr(args, "reference_class", "auto"))
    src = args.image
    if str(src).startswith("dicomweb://") or str(src).startswith("dicomweb+"):
        from retrieval.data.dicomweb import fetch_instance

        src = fetch_instance(src)
    options = dict(
        k=args.k,
        explain=args.explain,
        exclude_patient=args.exclude_patient,
        filters=_filters(args.filter),
        **_concept_weights(getattr(args, "concept", None)),
        like=refine.parse_ids(getattr(args, "like", None)),
        unlike=refine.parse_ids(getattr(args, "unlike", None)),
        region=None if getattr(args, "region", None) is None else refine.parse_box(args.region),
        coverage=args.coverage,
        group=args.group,
    )
    # read once: the query, --save-maps and the note on how it was read (a multi-frame DICOM's
    # middle frame, a multi-page TIFF's first page, a volume's middle slice) all use it
    image = r.preprocessor.read(src)
    note = load_note(image)
    result = r.query(image, **options)
    paths = {}
    if args.save_maps:
        paths = save_maps(result, args.save_maps, image)
    dicom_paths = _dicom_out(args, src, result)
    if args.json:
        out = result.to_json(paths)
        if dicom_paths:
            out["dicom_sr"] = {k: v for k, v in dicom_paths.items() if k != "lines"}
        out["input_note"] = note
        print(json.dumps(out, indent=2))
        return 0
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    for line in dicom_paths.get("lines", []):
        print(line)
    print(result.explanation_text)
    if result.contrast_note:
        print(result.contrast_note)
    if result.region is not None:
        print(f"region {result.region} (feature cells searched: {result.region_searched})")
        if result.region_note:
            print(f"note: {result.region_note}")
    if result.feedback:
        fb = result.feedback
        print(f"refined by example: like {fb['like'] or '-'}, unlike {fb['unlike'] or '-'}")
    pred = result.prediction
    print(probabilities_line(pred))
    if pred.set is not None:
        print(
            f"{pred.set_coverage:.0%} prediction set: {' or '.join(pred.set)} "
            f"(neighbour vote: {' or '.join(pred.knn_set or [])}; "
            f"{pred.set_note}) -> {result.outcome}"
        )
        if pred.set_uninformative:
            print(f"note: the set is uninformative: {pred.set_uninformative}")
    else:
        print(pred.set_note)
    print(
        f"OOD score {result.ood.score:.3g} (threshold {result.ood.threshold:.3g})"
        + ("  -> I DON'T KNOW" if result.ood.flag else "")
    )
    if result.self_match is not None:
        print(self_match_line(result.self_match))
    if not result.similarity_scale.get("calibrated", True):
        print(f"similarity score: {result.similarity_scale.get('method', '')}")
    for i, n in enumerate(result.neighbors, 1):
        score = "" if n.similarity_score is None else f"score {n.similarity_score:.2f} "
        print(f"{i:>2}. {n.case_id:<24} {n.label:<16} {score}(cosine {n.similarity:.4f})")
        for reg in n.matched_regions:
            side = " (opposite sides)" if reg.crosses_sides else ""
            print(
                f"      query {reg.query_box} ~ case {reg.case_box}: "
                f"{reg.share:.0%} of the similarity{side}"
            )
    for m, p in paths.items():
        print(f"map {m}: {p}")
    return 0
