"""Every indexed case's pixel fingerprint, stored at build so a self-match check reads no image.

A query is its own indexed case when a candidate at cosine >= 0.999 has the same pixels
(retrieval.service.self_match). Metric learning packs a class tightly, so dozens of other
cases can sit at 0.999 too; checking each by decoding its image cost a quarter of a
retrieval-only query (bench/refine.py). The fingerprints are the audit's
(`retrieval.audit.leakage.fingerprint`: SHA-256 of the 8-bit pixels, unit-norm zero-mean
32 x 32 grey thumbnail), computed from the pixels the build already decodes.

Files, under INDEX_DIR/fingerprints/ (covered by bundle.json's checksums; optional: bundles
built before them fall back to reading the candidates' images):

    sha256.npy   (N, 32) uint8 digest of each case's 8-bit pixels (exact)
    thumbs.npy   (N, 1024) float16 thumbnail (2 KB per case: 0.2 GB at 100k cases);
                 memory-mapped, so a query reads only its candidates' rows

float16 keeps the thumbnail correlation within THUMB_ERROR of its float64 value (each element's
relative rounding error is <= 2^-11 and the query thumbnail has unit norm, so the error of the
dot product is <= 2^-11 plus subnormal terms); the self-match check decides from the stored
thumbnail only when it is further than that from the threshold, and reads the image otherwise,
so its answers are the same as reading every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import BundleError

FP_DIR = "fingerprints"
SHA_FILE = f"{FP_DIR}/sha256.npy"
THUMBS_FILE = f"{FP_DIR}/thumbs.npy"
THUMB_ERROR = 1e-3  # > 2^-11 (4.9e-4): the float16 thumbnail's worst-case correlation error


def pack(hex_digest: str, thumb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One case's fingerprint (leakage.fingerprint's output) -> (32 uint8, float16 thumbnail)."""
    return (
        np.frombuffer(bytes.fromhex(hex_digest), np.uint8).copy(),
        np.asarray(thumb, np.float16),
    )


def write(root: Path, sha: np.ndarray, thumbs: np.ndarray) -> dict:
    """Write the two arrays under root/fingerprints/; returns bundle.json's description."""
    sha = np.ascontiguousarray(sha, np.uint8)
    thumbs = np.ascontiguousarray(thumbs, np.float16)
    if sha.ndim != 2 or sha.shape[1] != 32 or thumbs.shape[0] != sha.shape[0]:
        raise ValueError(f"fingerprints: shapes {sha.shape} and {thumbs.shape} do not match")
    (root / FP_DIR).mkdir(exist_ok=True)
    np.save(root / SHA_FILE, sha, allow_pickle=False)
    np.save(root / THUMBS_FILE, thumbs, allow_pickle=False)
    return {
        "cases": int(sha.shape[0]),
        "hash": "sha256 of the 8-bit decoded pixels and their shape",
        "thumbnail": f"{int(round(thumbs.shape[1] ** 0.5))}² grey, zero-mean, unit-norm, float16",
    }


@dataclass
class PixelFingerprints:
    sha: np.ndarray  # (N, 32) uint8
    thumbs: np.ndarray  # (N, T) float16, memory-mapped

    @classmethod
    def load(cls, index_dir: str | Path, n_cases: int) -> PixelFingerprints | None:
        """None when the bundle has none (built before them): callers read images instead."""
        root = Path(index_dir)
        if not (root / SHA_FILE).is_file() or not (root / THUMBS_FILE).is_file():
            return None
        try:
            sha = np.load(root / SHA_FILE, allow_pickle=False)
            thumbs = np.load(root / THUMBS_FILE, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise BundleError(f"{root / FP_DIR}: unreadable fingerprints ({err})") from None
        if sha.shape != (n_cases, 32) or thumbs.ndim != 2 or thumbs.shape[0] != n_cases:
            raise BundleError(
                f"{root / FP_DIR}: fingerprints for {sha.shape[0]} cases but the index has "
                f"{n_cases}; corrupted bundle"
            )
        return cls(sha, thumbs)

    def same_hash(self, row: int, hex_digest: str) -> bool:
        return self.sha[row].tobytes() == bytes.fromhex(hex_digest)

    def correlation(self, row: int, thumb: np.ndarray) -> float:
        """Stored thumbnail · query thumbnail (within THUMB_ERROR of the float64 value)."""
        return float(np.asarray(self.thumbs[row], np.float64) @ np.asarray(thumb, np.float64))
