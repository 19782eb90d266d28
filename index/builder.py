"""`casebase index build`: embed every case and write a bundle, atomically."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from index import bundle, fingerprints, region_index
from index.case_store import MANIFEST_RELATIVE, write_cases
from index.vector_index import VectorIndex
from retrieval import atomic
from retrieval.data.manifest import load_manifest
from retrieval.errors import CasebaseError
from retrieval.explain.similarity import SCORE_FILE, calibrate_scale
from retrieval.model.device import resolve_device
from retrieval.model.embedding import EmbeddedSet, embed_paths
from retrieval.model.network import CONFIG_FILE, WEIGHTS_FILE, load_model, weights_fingerprint
from retrieval.model.preprocess import Preprocessor
from retrieval.service.conformal import CONFORMAL_FILE, calibrate_table
from retrieval.service.ood import OOD_REFERENCE, calibrate

WEIGHTING_FORMULA = {
    "saliency": "e = normalize(P · Σ_ij s_ij F_ij), s = ReLU(Σ_k W_ck/hw · F_k) / Σ (Grad-CAM of the "
    "predicted class c at the last block; uniform if all zero)",
    "uniform": "e = normalize(P · mean_ij F_ij)",
}


@dataclass
class BuildReport:
    index_dir: str
    n_indexed: int
    factory: str
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def case_table(manifest, df: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows -> the bundle's case table (absolute paths, all strings)."""
    cases = df.copy()
    cases["image"] = [str(manifest.resolve(p)) for p in cases["image"]]
    if "mask" in cases:
        cases["mask"] = [str(manifest.resolve(p)) if p else "" for p in cases["mask"]]
    for col in ("split", "patient_id", "mask"):
        if col not in cases:
            cases[col] = "train" if col == "split" else ""
    return cases.fillna("").astype(str).reset_index(drop=True)


# Columns that already say how big each image is (ingest-dicom writes rows / columns).
SHAPE_COLUMNS = ("image_shape", "image_pixels", "rows", "columns")
MAX_SHAPE_GROUPS = 8  # more distinct shapes than this: the pixel count, binned by the audit


def add_shape_attribute(cases: pd.DataFrame, sizes, like: list[str] | None = None) -> pd.DataFrame:
    """cases with the original image size as an attribute, where the images differ in it.

    Every image is resized to the model's square input, so an image's original size survives
    only as resampling blur and stretch: a model can match on it (seen: 78 % of a photo set's
    top-5 neighbours shared the query's size where its label gave 50 %, and square films of
    112 or 128 px matched on their size 98 % of the time). As an attribute the audit tests it
    and the app can filter by it without the user having to add a column. ``image_shape``
    ("HxW", or "DxHxW") for up to MAX_SHAPE_GROUPS distinct shapes, else ``image_pixels``
    (H*W, which the audit bins into quartiles). ``like``: the index's attribute names, for
    query cases (add exactly the attribute the index has, nothing when it has none).
    """
    if sizes is None or len(sizes) != len(cases) or any(c in cases for c in SHAPE_COLUMNS):
        return cases
    shapes = ["x".join(str(int(v)) for v in row) for row in np.asarray(sizes)]
    pixels = [str(int(np.prod(row))) for row in np.asarray(sizes)]
    if like is not None:
        name = next((c for c in ("image_shape", "image_pixels") if c in like), None)
    elif len(set(shapes)) < 2:
        return cases
    else:
        name = "image_shape" if len(set(shapes)) <= MAX_SHAPE_GROUPS else "image_pixels"
    if name is None:
        return cases
    cases = cases.copy()
    cases[name] = shapes if name == "image_shape" else pixels
    return cases


def embed_manifest(
    model_dir,
    manifest_path,
    splits,
    weighting="saliency",
    batch_size=64,
    device="auto",
    strict=False,
    progress=True,
    engine="local",
    address=None,
    num_workers=None,
):
    """Embed the manifest's cases in the given splits -> (model, case table of the embedded, EmbeddedSet)."""
    dev = resolve_device("cpu" if engine == "ray" else device)  # ray: the actors pick theirs
    model = load_model(model_dir, dev)
    manifest = load_manifest(manifest_path)
    df = manifest.select(splits)
    if df.empty:
        raise CasebaseError(f"{manifest_path}: no cases in split(s) {', '.join(splits)}")
    cases = case_table(manifest, df)
    dup = cases["case_id"][cases["case_id"].duplicated()].unique().tolist()
    if dup:
        raise CasebaseError(
            f"{manifest_path}: duplicate case_id {', '.join(map(str, dup[:5]))}"
            f"{' …' if len(dup) > 5 else ''} (run casebase validate)"
        )
    if engine == "ray":
        from index.ray_engine import embed_with_ray

        emb = embed_with_ray(
            model_dir,
            cases["image"].tolist(),
            weighting,
            batch_size,
            address,
            progress=progress,
            strict=strict,
            device=device,
        )
    else:
        emb = embed_paths(
            model,
            Preprocessor(model.config),
            cases["image"].tolist(),
            weighting,
            batch_size,
            dev,
            strict,
            progress,
            num_workers=num_workers,
            # the region index (index.region_index), from the same forward pass (a volume's
            # cells are the voxels of its feature volume)
            cells=True,
            fingerprints=True,  # pixel fingerprints (index.fingerprints), from the same decode
        )
    return model, cases, emb


def write_bundle(
    out_dir,
    model_dir,
    model,
    cases: pd.DataFrame,
    emb: EmbeddedSet,
    weighting,
    factory,
    splits,
    extra_meta: dict | None = None,
    conformal: dict | None = None,
) -> dict:
    """conformal: coverage, method (aps|raps), group_attribute (Mondrian) for the prediction sets."""
    kept = add_shape_attribute(cases.iloc[emb.ok].reset_index(drop=True), emb.sizes)
    vindex = VectorIndex.build(emb.vectors, factory)
    calib = calibrate(emb.ood_features, kept["split"].to_numpy(), kept["patient_id"].to_numpy())
    # similarity_score: quantiles of the index's own top-10 neighbour cosines (SimilarityScale)
    score_q, score_meta = calibrate_scale(vindex.search, emb.vectors, kept["patient_id"].to_numpy())
    sets = calibrate_table(
        model.config,
        kept,
        emb.probabilities,
        emb.vectors,
        vindex,
        **(conformal or {}),
    )
    model_dir = Path(model_dir)
    meta = {
        "casebase_bundle": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_fingerprint": weights_fingerprint(model_dir),
        "model": {
            "backbone": model.config.backbone,
            "classes": model.config.classes,
            "image_size": model.config.image_size,
            "in_channels": model.config.in_channels,
        },
        "embedding": {
            "weighting": weighting,
            "dim": int(emb.vectors.shape[1]),
            "normalized": True,
            "metric": "inner_product (cosine)",
            "formula": WEIGHTING_FORMULA[weighting],
        },
        "faiss": {"factory": vindex.factory, "requested": factory, "ntotal": vindex.ntotal},
        "counts": {
            "cases": len(kept),
            "skipped": len(emb.failures),
            "by_label": kept["label"].value_counts().sort_index().to_dict(),
            "by_split": kept["split"].value_counts().sort_index().to_dict(),
        },
        "splits": list(splits),
        "ood": calib.to_dict(),
        "similarity_score": score_meta,
    }
    if (kept["patient_id"] != "").any():  # which PHI key hashed them (privacy.key_check)
        from retrieval.data.privacy import key_check

        meta["patient_key_check"] = key_check()
    meta["calibration"] = sets.meta
    if sets.conformal is not None:
        meta["conformal"] = sets.conformal.summary()
    meta.update(extra_meta or {})
    root = Path(meta["manifest"]).parent if meta.get("manifest") else None
    if root is not None:  # no absolute data location in the bundle (index.case_store)
        meta["case_paths"] = MANIFEST_RELATIVE
    with atomic.atomic_dir(out_dir) as tmp:
        vindex.save(tmp / "vectors.faiss")
        write_cases(kept, tmp / "cases.parquet", root)
        np.save(
            tmp / OOD_REFERENCE,
            emb.ood_features[calib.reference_rows].astype(np.float32),
            allow_pickle=False,
        )
        if len(score_q):
            np.save(tmp / SCORE_FILE, score_q.astype(np.float64), allow_pickle=False)
        if sets.conformal is not None:
            (tmp / CONFORMAL_FILE).write_bytes(sets.conformal.to_json())
        (tmp / "model").mkdir()
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            shutil.copy2(model_dir / name, tmp / "model" / name)
        if emb.cells is not None:  # region index; the ray engine keeps no cells (yet)
            meta["regions"] = {
                **region_index.write(
                    tmp, emb.cells, emb.cell_weights, emb.sizes, lesion=emb.lesion_fractions
                ),
                "grid": list(emb.grid),
            }
        if emb.pixel_sha256 is not None:  # self-match without reading images (self_match.py)
            meta["pixel_fingerprints"] = fingerprints.write(tmp, emb.pixel_sha256, emb.pixel_thumbs)
        meta = bundle.seal(tmp, meta)
    return meta


def build_index(
    model_dir,
    manifest_path,
    out_dir,
    weighting="saliency",
    factory="auto",
    splits=("train", "val"),
    batch_size=64,
    device="auto",
    strict=False,
    progress=True,
    engine="local",
    address=None,
    num_workers=None,
    coverage=0.9,
    conformal_method="aps",
    mondrian=None,
) -> BuildReport:
    """num_workers: DataLoader decoding processes (None: retrieval.model.dataset.default_workers()).

    coverage / conformal_method / mondrian: the prediction sets calibrated at build (conformal.py).
    """
    t0 = time.time()
    model, cases, emb = embed_manifest(
        model_dir,
        manifest_path,
        list(splits),
        weighting,
        batch_size,
        device,
        strict,
        progress,
        engine,
        address,
        num_workers,
    )
    skipped = [f.message for f in emb.failures]
    for msg in skipped:
        tqdm.write(f"skipped: {msg}")
    if not emb.ok:
        raise CasebaseError("no image could be embedded; nothing to index")
    embed_s = time.time() - t0
    meta = write_bundle(
        out_dir,
        model_dir,
        model,
        cases,
        emb,
        weighting,
        factory,
        splits,
        {"manifest": str(Path(manifest_path).resolve())},
        {"coverage": coverage, "method": conformal_method, "group_attribute": mondrian},
    )
    return BuildReport(
        str(out_dir),
        len(emb.ok),
        meta["faiss"]["factory"],
        skipped,
        time.time() - t0,
        len(cases) / max(embed_s, 1e-9),
    )
