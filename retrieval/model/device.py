"""Device choice: CUDA when asked or available, else CPU, always with a clean fallback."""

from __future__ import annotations

import torch

from retrieval.errors import CasebaseError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if name == "cuda":
        if not has_cuda:
            raise CasebaseError("--device cuda was asked for but no CUDA device is available")
        return torch.device("cuda")
    if name != "auto":
        raise CasebaseError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device("cuda" if has_cuda else "cpu")
