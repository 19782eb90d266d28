"""JSON that other tools can read: numpy scalars to Python, NaN/inf to null.

Python's json writes NaN as a bare `NaN`, which is not JSON; a statistic over too
few cases (a bootstrap CI over one case) is honestly undefined, and null says so.
"""

from __future__ import annotations

import math

import numpy as np


def clean(obj):
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
