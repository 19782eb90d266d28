"""The refinement trail of one query in the app: whole image -> region box -> +like X -> ...

Each step keeps the full query it ran (region, liked, unliked: cumulative, so a step can be
re-run or returned to on its own) and the answer it got, so that undo shows the previous
answer again without querying. Pure data (no Streamlit): the page pieces in refine.py hold a
Trail in the session state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from retrieval.service.results import box_ranges

Box = tuple[int, ...]  # (x0, y0, x1, y1) of an image, (x0, y0, z0, x1, y1, z1) of a volume


@dataclass(frozen=True)
class Refinement:
    """What a query asks on top of the image: a region of it and case-level feedback."""

    region: Box | None = None  # in the query's original pixels (voxels), ends exclusive
    like: tuple[str, ...] = ()
    unlike: tuple[str, ...] = ()

    def with_region(self, box: Box | None) -> Refinement:
        return Refinement(
            None if box is None else tuple(int(v) for v in box), self.like, self.unlike
        )

    def with_feedback(self, like, unlike) -> Refinement:
        """Add liked / unliked case ids; a case marked again the other way changes sides."""
        like, unlike = list(dict.fromkeys(like)), list(dict.fromkeys(unlike))
        keep_like = [c for c in self.like if c not in unlike]
        keep_unlike = [c for c in self.unlike if c not in like]
        return Refinement(
            self.region,
            tuple(dict.fromkeys(keep_like + like)),
            tuple(dict.fromkeys(keep_unlike + unlike)),
        )

    def query_kwargs(self) -> dict:
        """The keyword arguments of CaseRetriever.query this refinement adds."""
        out: dict = {}
        if self.region is not None:
            out["region"] = tuple(float(v) for v in self.region)
        if self.like:
            out["like"] = list(self.like)
        if self.unlike:
            out["unlike"] = list(self.unlike)
        return out


def box_text(box: Box) -> str:
    """'x 10–39, y 12–43' of an image's box (10, 12, 40, 44); 'x 10–39, y 12–43, z 2–4' of a
    volume's: first and last index, inclusive (retrieval.service.results.box_ranges)."""
    return box_ranges(box)


def step_label(prev: Refinement | None, new: Refinement, whole: str = "whole image") -> str:
    """How the trail names the step from prev to new ("whole image", "region …", "+like …");
    whole: what a search without a region is called ("whole volume" for a volume)."""
    if prev is None:
        return whole if new.region is None else f"region {box_text(new.region)}"
    parts = []
    if new.region != prev.region:
        parts.append(whole if new.region is None else f"region {box_text(new.region)}")
    added_like = [c for c in new.like if c not in prev.like]
    added_unlike = [c for c in new.unlike if c not in prev.unlike]
    if added_like:
        parts.append("+like " + ", ".join(added_like))
    if added_unlike:
        parts.append("−unlike " + ", ".join(added_unlike))
    return " · ".join(parts) or "same search again"


@dataclass
class Step:
    label: str
    refinement: Refinement
    result: Any  # the QueryResult this step got
    uid: int = 0  # unique within the trail, also after undo (keys the step's 👍 / 👎 widgets)


@dataclass
class Trail:
    """The steps of one query, first to current; never empty once started."""

    steps: list[Step] = field(default_factory=list)
    next_uid: int = 0
    whole: str = "whole image"  # a step without a region ("whole volume" for a volume)

    @property
    def current(self) -> Step:
        return self.steps[-1]

    @property
    def refinement(self) -> Refinement:
        return self.steps[-1].refinement if self.steps else Refinement()

    def push(self, refinement: Refinement, result) -> Step:
        prev = self.steps[-1].refinement if self.steps else None
        step = Step(step_label(prev, refinement, self.whole), refinement, result, self.next_uid)
        self.next_uid += 1
        self.steps.append(step)
        return step

    def undo(self) -> bool:
        """Drop the last step (the first one stays); False when there was nothing to undo."""
        if len(self.steps) <= 1:
            return False
        self.steps.pop()
        return True

    def reset(self) -> bool:
        """Back to the first step; False when already there."""
        if len(self.steps) <= 1:
            return False
        del self.steps[1:]
        return True

    def labels(self) -> list[str]:
        return [s.label for s in self.steps]
