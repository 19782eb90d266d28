"""The worst examples: queries whose neighbours share the attribute but not the label.

For the attribute under suspicion (the flagged one with the largest lift, or
else the one with the largest lift), queries are ranked by how many of their
top-5 neighbours have the query's attribute value but another label. For the
first few, the query and those neighbours are rendered with the similarity
decomposition's map and its matched-region boxes on both images (green: the
strongest pair, amber: the next), so a reader sees *where* they matched.

Images are downscaled to at most 256 px for the report; only case ids, labels
and attribute values travel with them.

A volume ((D, H, W, C) pixels) is shown on one axial slice: the one holding most of the map's
positive mass (:func:`retrieval.explain.overlay.best_slice`, the slice ``casebase query
--save-maps`` overlays), else the centre slice of the strongest box, else the middle slice; the
boxes that slice cuts are drawn, and the picture is labelled with the slice ("slice 14 of 0–27").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from retrieval.errors import CasebaseError
from retrieval.explain.overlay import (
    best_slice,
    draw_boxes,
    draw_label,
    overlay,
    png_bytes,
    slice_label,
)

MAX_SIDE = 256


@dataclass
class Panel:
    case_id: str
    label: str
    value: str
    png: bytes
    similarity: float | None = None  # the raw cosine
    score: float | None = None  # similarity_score: what the app shows, in [0, 1]
    contribution: float | None = None  # share of the similarity carried by the top matched pair
    slice: str | None = None  # a volume's: which axial slice the picture shows ("slice 4 of 0–7")


@dataclass
class SliceView:
    """What of a volume a panel shows: one axial slice, its map and the boxes it cuts."""

    index: int
    depth: int
    pixels: np.ndarray  # (H, W, C)
    heat: np.ndarray | None  # (H, W)
    boxes: list[list[int]]  # [x0, y0, x1, y1] of the boxes cutting the slice, in order
    first_kept: bool  # whether the strongest (first) box is among them

    @property
    def label(self) -> str:
        return slice_label(self.index, self.depth)


def volume_view(pixels: np.ndarray, heat: np.ndarray | None, boxes: list[list[int]]) -> SliceView:
    """The axial slice of a (D, H, W, C) volume a panel shows (see the module docstring).

    ``heat``: the (D, H, W) map (a 2-D map: a 2-D model's, of the middle slice, shown there);
    ``boxes``: [x0, y0, z0, x1, y1, z1] (a 4-box: on the middle slice)."""
    d = int(pixels.shape[0])
    h = None if heat is None else np.nan_to_num(np.asarray(heat, np.float32))
    if h is not None and h.ndim == 2:
        k = d // 2
    elif h is not None and h.ndim == 3 and h.shape[0] == d and (h > 0).any():
        k = best_slice(h)
    elif boxes and len(boxes[0]) == 6:
        z0, z1 = int(boxes[0][2]), int(boxes[0][5])
        k = (z0 + max(z1, z0 + 1) - 1) // 2
    else:
        k = d // 2
    k = int(np.clip(k, 0, d - 1))
    if h is None:
        heat2d = None
    elif h.ndim == 3:
        heat2d = h[k] if h.shape[0] == d else None
    else:
        heat2d = h if h.ndim == 2 else None
    cut, first_kept = [], False
    for i, b in enumerate(boxes):
        if len(b) == 6:
            keep = int(b[2]) <= k < int(b[5])
            b2 = [b[0], b[1], b[3], b[4]]
        else:  # a 2-D model's box, of the middle slice
            keep = k == d // 2
            b2 = list(b)
        if keep:
            cut.append([int(v) for v in b2])
            first_kept = first_kept or i == 0
    return SliceView(k, d, np.asarray(pixels[k]), heat2d, cut, first_kept)


@dataclass
class Example:
    attribute: str
    query: Panel
    neighbors: list[Panel] = field(default_factory=list)


def render(
    pixels: np.ndarray, heat: np.ndarray | None, boxes: list[list[int]], max_side: int = MAX_SIDE
) -> bytes:
    """PNG of the image (+ map) with boxes, downscaled to ``max_side`` (boxes scaled along).

    A volume ((D, H, W, C) pixels) is drawn on the slice :func:`volume_view` picks, labelled
    with it."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    label, first_green = None, True
    if pixels.ndim == 4:
        view = volume_view(pixels, heat, boxes)
        pixels, heat, boxes = view.pixels, view.heat, view.boxes
        label, first_green = view.label, view.first_kept
    h, w = pixels.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        chans = [
            np.asarray(
                Image.fromarray(pixels[:, :, c].astype(np.float32)).resize((nw, nh), Image.BILINEAR)
            )
            for c in range(pixels.shape[2])
        ]
        pixels = np.stack(chans, axis=2)
        if heat is not None:
            heat = np.asarray(
                Image.fromarray(np.asarray(heat, np.float32)).resize((nw, nh), Image.BILINEAR)
            )
        boxes = [[int(round(v * s)) for v in b] for b in boxes]
    rgb = (
        overlay(pixels, heat, alpha=0.35)
        if heat is not None
        else overlay(pixels, np.zeros(pixels.shape[:2]), 0)
    )
    # the strongest box is green; when the slice misses it, those it cuts are all amber
    rgb = draw_boxes(rgb, boxes) if first_green else draw_boxes(rgb, boxes, color=(255, 200, 0))
    return png_bytes(rgb if label is None else draw_label(rgb, label))


def panel_slice(pixels: np.ndarray, heat: np.ndarray | None, boxes: list[list[int]]) -> str | None:
    """The slice label of a volume's panel (None for a 2-D image)."""
    pixels = np.asarray(pixels)
    return volume_view(pixels, heat, boxes).label if pixels.ndim == 4 else None


def pick_attribute(attributes: dict[str, dict]) -> str | None:
    flagged = [(v.get("lift") or 0, n) for n, v in attributes.items() if v.get("flagged")]
    if flagged:
        return max(flagged)[1]
    lifts = [(v.get("lift") or 0, n) for n, v in attributes.items() if v.get("lift") is not None]
    return max(lifts)[1] if lifts else None


def rank_queries(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    hits,
    index_codes: np.ndarray,
    index_labels: np.ndarray,
    k: int = 5,
) -> list[tuple[int, list[tuple[float, int]]]]:
    """[(query row, [(sim, index row) sharing the value but not the label])], worst first."""
    scored = []
    for qi, hs in enumerate(hits):
        if query_codes[qi] < 0:
            continue
        bad = [
            (s, row)
            for s, row in hs[:k]
            if index_codes[row] == query_codes[qi] and index_labels[row] != query_labels[qi]
        ]
        if bad:
            scored.append((len(bad), float(np.mean([s for s, _ in bad])), qi, bad))
    scored.sort(key=lambda t: (-t[0], -t[1], t[2]))
    return [(qi, bad) for _, _, qi, bad in scored]


def build_examples(
    r, query_cases, hits, attr, n_examples: int = 4, per_query: int = 3, k: int = 5
) -> list[Example]:
    """Render the worst examples for one coded attribute (see the module docstring)."""
    index_labels = r.cases["label"].astype(str).to_numpy()
    qlabels = query_cases["label"].astype(str).to_numpy()
    ranked = rank_queries(attr.query_codes, qlabels, hits, attr.index_codes, index_labels, k)
    out: list[Example] = []
    for qi, bad in ranked:
        if len(out) >= n_examples:
            break
        try:
            q = r.encode(query_cases.at[qi, "image"])
        except CasebaseError:
            continue
        nbs = [r.neighbor(s, row) for s, row in bad[:per_query]]
        ctxs = r._neighbor_contexts(nbs)
        panels, q_boxes, q_maps = [], [], []
        for nb, c in zip(nbs, ctxs, strict=True):
            if c is None:
                continue
            r.match_regions(q, c, nb)
            top = nb.matched_regions[0] if nb.matched_regions else None
            c_map, c_boxes = nb.maps["similarity"]["case"], [m.case_box for m in nb.matched_regions]
            panels.append(
                Panel(
                    nb.case_id,
                    nb.label,
                    attr.groups[int(attr.index_codes[nb.row])],
                    render(c.image.pixels, c_map, c_boxes),
                    similarity=float(nb.similarity),
                    score=None if nb.similarity_score is None else float(nb.similarity_score),
                    contribution=float(top.share) if top is not None else None,
                    slice=panel_slice(c.image.pixels, c_map, c_boxes),
                )
            )
            q_boxes += [m.query_box for m in nb.matched_regions[:1]]
            q_maps.append(nb.maps["similarity"]["query"])
        if not panels:
            continue
        qmap = np.mean(q_maps, axis=0) if q_maps else None
        qpanel = Panel(
            str(query_cases.at[qi, "case_id"]),
            str(qlabels[qi]),
            attr.groups[int(attr.query_codes[qi])],
            render(q.image.pixels, qmap, q_boxes),
            slice=panel_slice(q.image.pixels, qmap, q_boxes),
        )
        out.append(Example(attr.name, qpanel, panels))
    return out
