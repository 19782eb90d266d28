"""Index builds on a Ray cluster (`casebase index build ... --engine ray [--address ADDR]`).

Ray Data reads the case list, decodes images in parallel tasks, and runs the
saliency-weighted embedding in an actor pool (one model per actor; one GPU
per actor when the cluster has GPUs). The driver gathers the vectors in case
order and writes exactly the bundle a local build writes (index.builder), so
both engines give the same bundle to float tolerance.

Needs the optional extra: `pip install 'casebase[ray]'`.
"""

from __future__ import annotations

import numpy as np

from retrieval.errors import CasebaseError
from retrieval.model.dataset import Failure
from retrieval.model.embedding import EmbeddedSet


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CasebaseError("--engine ray needs Ray: pip install 'casebase[ray]'") from None
    return ray


class _Decoder:
    """Stateless decode step: paths -> uint8 tensors at the model's input size (or an error)."""

    def __init__(self, model_dir: str):
        import json
        from pathlib import Path

        from retrieval.model.network import CONFIG_FILE, ModelConfig
        from retrieval.model.preprocess import Preprocessor

        cfg = ModelConfig.from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))
        self.pre = Preprocessor(cfg)
        # a volume model (cnn3d, cfg.depth > 0) takes (C, D', S, S)
        spatial = (cfg.image_size, cfg.image_size)
        self.shape = (cfg.in_channels, *((cfg.depth,) if cfg.depth else ()), *spatial)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["row"])
        pixels = np.zeros((n, *self.shape), np.uint8)
        errors = [""] * n
        for i, path in enumerate(batch["path"]):
            try:
                pixels[i] = self.pre.to_uint8(self.pre.read(str(path))).numpy()
            except CasebaseError as err:
                errors[i] = str(err)
            except Exception as err:  # noqa: BLE001 - any decoder bug is a per-file message
                errors[i] = f"{path}: cannot decode ({type(err).__name__}: {err})"
        return {
            "row": np.asarray(batch["row"]),
            "pixels": pixels,
            "error": np.asarray(errors, dtype=object),
        }


class _Embedder:
    """Actor: loads the model once, embeds decoded batches."""

    def __init__(self, model_dir: str, weighting: str, device: str = "auto"):
        import torch

        from retrieval.model.device import resolve_device
        from retrieval.model.network import load_model
        from retrieval.model.preprocess import Preprocessor

        torch.set_num_threads(1)
        self.device = resolve_device(device)
        self.model = load_model(model_dir, self.device)
        self.pre = Preprocessor(self.model.config)
        self.weighting = weighting

    def __call__(self, batch: dict) -> dict:
        import torch

        from retrieval.model.embedding import embed_tensor

        ok = np.array([not e for e in batch["error"]], dtype=bool)
        d, k = self.model.config.output_dim, len(self.model.config.classes)
        c = self.model.backbone.out_channels
        n = len(ok)
        vec, prob, ood = (
            np.zeros((n, d), np.float32),
            np.zeros((n, k), np.float32),
            np.zeros((n, c), np.float32),
        )
        if ok.any():
            x = self.pre.normalize(torch.from_numpy(batch["pixels"][ok]).to(self.device))
            vec[ok], prob[ok], ood[ok] = embed_tensor(self.model, x, self.weighting)
        return {
            "row": batch["row"],
            "vector": vec,
            "prob": prob,
            "ood": ood,
            "error": batch["error"],
        }


def embed_with_ray(
    model_dir,
    paths,
    weighting="saliency",
    batch_size=64,
    address=None,
    num_actors: int | None = None,
    progress: bool = True,
    strict: bool = False,
    device: str = "auto",
) -> EmbeddedSet:
    """Embed ``paths`` on a Ray cluster.

    ``strict``: the first unreadable image stops the build with an error, as
    the local engine does. ``device``: ``cpu`` runs the actors without GPUs
    even on a GPU cluster; ``cuda`` requires GPUs in the cluster (one per
    actor); ``auto`` uses them when the cluster has them.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise CasebaseError(f"unknown device {device!r}: use auto, cpu or cuda")
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                ignore_reinit_error=True,
            )
        except Exception as err:  # noqa: BLE001 - connection problems become one line
            raise CasebaseError(
                f"cannot reach a Ray cluster at {address or 'local'}: {err}"
            ) from None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ctx.execution_options.preserve_order = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if device == "cuda" and not gpus:
            raise CasebaseError(
                f"--device cuda was asked for but the Ray cluster at {address or 'local'} has no GPU"
            )
        if device == "cpu":
            gpus = 0
        actors = num_actors or max(1, gpus or int(resources.get("CPU", 1)) // 2)
        model_dir = str(model_dir)
        ds = ray.data.from_items([{"row": i, "path": str(p)} for i, p in enumerate(paths)])
        ds = ds.map_batches(
            _Decoder,
            fn_constructor_kwargs={"model_dir": model_dir},
            batch_size=batch_size,
            concurrency=max(1, actors),
            batch_format="numpy",
        )
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_kwargs={
                "model_dir": model_dir,
                "weighting": weighting,
                "device": "cuda" if gpus else "cpu",
            },
            batch_size=batch_size,
            concurrency=actors,
            num_gpus=1 if gpus else 0,
            batch_format="numpy",
        )
        rows, vecs, probs, oods, errors = [], [], [], [], []
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows.append(b["row"])
            vecs.append(b["vector"])
            probs.append(b["prob"])
            oods.append(b["ood"])
            errors.extend(b["error"].tolist())
            if strict:
                bad = next((str(e) for e in b["error"].tolist() if e), "")
                if bad:  # stop the pipeline at the first unreadable image, as locally
                    raise CasebaseError(f"{bad} (--strict: stopping at the first bad file)")
    finally:
        if started_here:
            ray.shutdown()
    row = np.concatenate(rows)
    order = np.argsort(row, kind="stable")
    row, errors = row[order], [errors[i] for i in order]
    vec, prob, ood = (np.concatenate(a)[order] for a in (vecs, probs, oods))
    good = np.array([not e for e in errors], dtype=bool)
    failures = [Failure(int(r), str(e)) for r, e in zip(row, errors, strict=True) if e]
    return EmbeddedSet(vec[good], prob[good], row[good].astype(int).tolist(), ood[good], failures)
