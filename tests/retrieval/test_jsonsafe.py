import json

import numpy as np

from retrieval.jsonsafe import clean


def test_non_finite_become_null_and_numpy_becomes_python():
    data = {"ci": (float("nan"), np.float32(0.5)), "n": np.int64(3), "a": np.array([1.0, np.inf])}
    out = clean(data)
    assert out == {"ci": [None, 0.5], "n": 3, "a": [1.0, None]}
    json.dumps(out, allow_nan=False)  # strict JSON
