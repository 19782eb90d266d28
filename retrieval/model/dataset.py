"""Decoding manifest images into model-sized uint8 tensors, in parallel, skipping bad files.

Training caches every decoded image once (uint8 at the model's input size:
a 20k-case RGB set at 128 px is 1 GB); index builds stream batches instead.
A file that cannot be read is reported by the caller and skipped, never the
end of the run (unless --strict).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from retrieval.errors import CasebaseError, ImageReadError
from retrieval.model.preprocess import Preprocessor


@dataclass
class Failure:
    index: int
    message: str


class _Decode(Dataset):
    def __init__(
        self, paths: Sequence[str], preprocessor: Preprocessor, fingerprints: bool = False
    ):
        self.paths = list(paths)
        self.pre = preprocessor
        self.fingerprints = fingerprints

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = self.pre.read(self.paths[i])
            fp = None
            if self.fingerprints:  # index.fingerprints: from the pixels decoded anyway
                from retrieval.audit.leakage import fingerprint  # lazy: the audit imports a lot

                fp = fingerprint(fingerprint_pixels(image.pixels))
            return i, self.pre.to_uint8(image), None, (tuple(image.original_size), fp)
        except ImageReadError as err:
            return i, None, str(err), None
        except Exception as err:  # noqa: BLE001 - any decoder bug becomes a per-file message
            return i, None, f"{self.paths[i]}: cannot decode ({type(err).__name__}: {err})", None


def fingerprint_pixels(pixels):
    """A volume (D, H, W, C) is fingerprinted on its middle slice, as read_image reads it
    (so the audit's fingerprints of the same file agree)."""
    return pixels[pixels.shape[0] // 2] if pixels.ndim == 4 else pixels


def _collate(items):
    return items


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def iter_decoded(
    paths: Sequence[str],
    preprocessor: Preprocessor,
    batch_size: int = 64,
    num_workers: int | None = None,
    desc: str = "decoding",
    strict: bool = False,
    progress: bool = True,
    sizes: dict[int, tuple[int, int]] | None = None,
    fingerprints: dict[int, tuple[str, object]] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[Failure]]]:
    """Yield (indices, uint8 batch, failures) in manifest order; decoding overlaps compute.

    sizes: filled with index -> original (H, W) of every decoded image (the region index maps
    feature cells back to original pixels with it).
    fingerprints: filled with index -> the audit's pixel fingerprint (hash, thumbnail) of every
    decoded image (index.fingerprints).
    """
    workers = default_workers() if num_workers is None else num_workers
    loader = DataLoader(
        _Decode(paths, preprocessor, fingerprints is not None),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for items in loader:
            good = [(i, t) for i, t, _, _ in items if t is not None]
            fails = [Failure(i, msg) for i, _, msg, _ in items if msg is not None]
            if sizes is not None:
                sizes.update({i: ex[0] for i, t, _, ex in items if t is not None})
            if fingerprints is not None:
                fingerprints.update({i: ex[1] for i, t, _, ex in items if t is not None})
            if strict and fails:
                raise CasebaseError(
                    f"{fails[0].message} (--strict: stopping at the first bad file)"
                )
            bar.update(len(items))
            batch = torch.stack([t for _, t in good]) if good else None
            yield [i for i, _ in good], batch, fails


def decode_all(paths: Sequence[str], preprocessor: Preprocessor, **kw):
    """Decode everything: (uint8 tensor (N_ok, C, S, S), ok indices, failures)."""
    idx: list[int] = []
    chunks: list[torch.Tensor] = []
    failures: list[Failure] = []
    for i, batch, fails in iter_decoded(paths, preprocessor, **kw):
        idx += i
        if batch is not None:
            chunks.append(batch)
        failures += fails
    if not chunks:
        return None, idx, failures
    return torch.cat(chunks), idx, failures
