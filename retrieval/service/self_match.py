"""Is the query itself an indexed case?

An indexed case queried again comes back as its own nearest neighbour at
cosine 1.000 (the index build and the query preprocess identically), which
reads as "a perfect match" when it is only the same picture. A query is
recognised as an indexed case when

* the caller knows its case id and the index holds that id, or
* one of its 3 nearest indexed cases has cosine >= 0.999 *and* the same
  pixels: the same SHA-256 of the 8-bit decoded pixels, or 32 x 32 grey
  thumbnails (zero-mean) correlating >= 0.995 (a re-encoded or re-windowed
  copy). The embedding alone is not proof: metric learning packs a class
  tightly, so two patients can sit at 0.999.

The thumbnail and hash are the audit's leakage fingerprints
(`retrieval.audit.leakage.fingerprint`), so the app and the audit agree on
what a duplicate is. Bundles store every case's fingerprint (index.fingerprints),
so a candidate is judged without reading its image: equal hashes are identical
pixels; a stored float16 thumbnail clearly below the threshold is not the same
picture. Only a thumbnail correlation within THUMB_ERROR of the threshold (or
above it: the reason states the exact value), or a bundle built before the
fingerprints, reads the candidate's image, so the answers are those of reading
every candidate. Stored fingerprints describe the pixels that were indexed.
"""

from __future__ import annotations

import numpy as np

from index.fingerprints import THUMB_ERROR
from retrieval.errors import CasebaseError
from retrieval.service.results import SelfMatch

SELF_COSINE = 0.999
SELF_THUMB = 0.995
CANDIDATES = 3


def find_self_match(r, q, case_id: str | None = None) -> tuple[SelfMatch, int] | None:
    """(the match, its row in the index) or None; `q` is the query's ImageContext."""
    ids = r.cases["case_id"].astype(str).to_numpy()
    if case_id:
        rows = np.flatnonzero(ids == str(case_id))
        if len(rows):
            return SelfMatch(str(case_id), "same case id", None), int(rows[0])
    from retrieval.audit.leakage import fingerprint  # lazy: the audit imports the service
    from retrieval.data.imageio import read_image

    hits = r.search(q.embedding.float().cpu().numpy(), CANDIDATES)[0]
    if not hits or hits[0][0] < SELF_COSINE:
        return None
    from retrieval.model.dataset import fingerprint_pixels

    q_hash, q_thumb = fingerprint(fingerprint_pixels(q.image.pixels))
    stored = getattr(r, "fingerprints", None)
    for sim, row in hits:
        if sim < SELF_COSINE:
            break
        if stored is not None:
            if stored.same_hash(row, q_hash):
                return SelfMatch(str(ids[row]), "identical pixels", float(sim)), int(row)
            if stored.correlation(row, q_thumb) < SELF_THUMB - THUMB_ERROR:
                continue  # not the same picture, whatever the rounding: no image read
        try:
            c_hash, c_thumb = fingerprint(read_image(r.cases.at[row, "image"]).pixels)
        except CasebaseError:
            continue
        if c_hash == q_hash:
            return SelfMatch(str(ids[row]), "identical pixels", float(sim)), int(row)
        corr = float(q_thumb @ c_thumb)
        if corr >= SELF_THUMB:
            reason = f"the same picture (thumbnail correlation {corr:.3f})"
            return SelfMatch(str(ids[row]), reason, float(sim)), int(row)
    return None
