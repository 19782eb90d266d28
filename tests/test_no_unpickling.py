"""Nothing is ever unpickled (DESIGN.md): a static scan of the product's code.

Every ``.py`` file of ``retrieval/``, ``index/``, ``app.py`` and ``bench/`` is parsed
(AST, so docstrings and comments that *mention* pickle do not count) and checked for:

* importing ``pickle`` / ``cPickle`` / ``_pickle`` / ``dill`` / ``cloudpickle`` /
  ``joblib`` / ``shelve`` (or anything from them);
* ``torch.load(...)`` without ``weights_only=True``;
* ``np.load(...)`` / ``numpy.load(...)`` without ``allow_pickle=False``;
* ``allow_pickle=True`` anywhere;
* ``joblib.load``, ``pandas.read_pickle`` / ``DataFrame.to_pickle`` (any ``.read_pickle`` call).

Module aliases (``import numpy as xp``, ``from torch import load``) are followed.
A planted bad file proves the scanner finds each pattern, and a planted good file
(pickle in docstrings, ``allow_pickle=False``, ``weights_only=True``) proves it
does not cry wolf.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


@dataclass(frozen=True)
class Hit:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str):
        self.path = path
        self.hits: list[Hit] = []
        self.modules: dict[str, str] = {}  # local name -> module (numpy, torch, ...)
        self.functions: dict[str, str] = {}  # local name -> "module.function"

    def hit(self, node, what: str) -> None:
        self.hits.append(Hit(self.path, getattr(node, "lineno", 0), what))

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            root = a.name.split(".")[0]
            if root in PICKLING_MODULES:
                self.hit(node, f"import {a.name}")
            self.modules[a.asname or root] = a.name if a.asname else root
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if mod.split(".")[0] in PICKLING_MODULES:
            self.hit(node, f"from {mod} import ...")
        for a in node.names:
            if a.name in PICKLING_MODULES:
                self.hit(node, f"from {mod} import {a.name}")
            self.functions[a.asname or a.name] = f"{mod}.{a.name}"
            self.modules.setdefault(a.asname or a.name, f"{mod}.{a.name}")
        self.generic_visit(node)

    def _qualname(self, func) -> str:
        """Best-effort dotted name of a call target with aliases resolved."""
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if isinstance(func, ast.Name):
            base = self.functions.get(func.id) or self.modules.get(func.id) or func.id
            parts.append(base)
        else:
            return ""
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualname(node.func)
        last = name.rsplit(".", 1)[-1]
        allow = _kw(node, "allow_pickle")
        if allow is not None and not _is_const(allow, False):
            self.hit(node, f"{name or 'call'}(allow_pickle={ast.unparse(allow)})")
        if name in ("torch.load", "torch.serialization.load") and not _is_const(
            _kw(node, "weights_only"), True
        ):
            self.hit(node, f"{name}(...) without weights_only=True")
        if name in ("numpy.load", "np.load", "numpy.lib.npyio.load") and not _is_const(
            allow, False
        ):
            self.hit(node, f"{name}(...) without allow_pickle=False")
        if name.split(".")[0] in PICKLING_MODULES:
            self.hit(node, f"{name}(...)")
        if last in ("read_pickle", "to_pickle"):
            self.hit(node, f"{name}(...)")
        self.generic_visit(node)


def scan_source(source: str, path: str) -> list[Hit]:
    s = _Scanner(path)
    s.visit(ast.parse(source, filename=path))
    # "import numpy as np" maps np -> numpy; calls spelled np.load resolve to numpy.load
    return s.hits


def product_files() -> list[Path]:
    files = []
    for rel in ("retrieval", "index", "bench"):
        files += sorted((REPO / rel).rglob("*.py"))
    if (REPO / "app.py").is_file():
        files.append(REPO / "app.py")
    return files


def test_no_unpickling_anywhere_in_the_product():
    files = product_files()
    assert (
        len([f for f in files if f.parts[-2] in ("retrieval", "commands", "explain", "audit")])
        >= 10
    )
    assert any(f.name == "bundle.py" for f in files) and any(f.name == "imageio.py" for f in files)
    hits = []
    for f in files:
        hits += scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))
    assert not hits, "unpickling hazards:\n" + "\n".join(map(str, hits))


PLANTED_BAD = """
import pickle
import cPickle as cp
import numpy as xp
import joblib
import torch
from torch import load as tload
from numpy import load
import pandas as pd
from dill import loads

a = pickle.loads(b"")
b = xp.load("x.npy")
c = xp.load("x.npy", allow_pickle=True)
d = torch.load("w.pt")
e = torch.load("w.pt", weights_only=False)
f = tload("w.pt")
g = load("x.npy")
h = joblib.load("m.joblib")
i = pd.read_pickle("df.pkl")
j = xp.lib.format.read_array(fh, allow_pickle=True)
k = xp.load("x.npy", allow_pickle=flag)
"""

PLANTED_GOOD = '''
"""Nothing is unpickled here: no pickle, no torch.load(, no allow_pickle=True, np.load( only safely."""
import numpy as np
import torch
from safetensors.torch import load_file

# pickle is mentioned in a comment, torch.load( and allow_pickle=True too
a = np.load("x.npy", allow_pickle=False)
b = torch.load("w.pt", weights_only=True)
c = np.save("y.npy", a, allow_pickle=False)
d = load_file("w.safetensors")
s = "import pickle; pickle.loads(x); np.load(p, allow_pickle=True)"
'''


def test_the_scanner_finds_every_planted_hazard(tmp_path):
    bad = tmp_path / "planted_bad.py"
    bad.write_text(PLANTED_BAD)
    hits = scan_source(bad.read_text(), bad.name)
    lines = {h.line for h in hits}
    text = bad.read_text().splitlines()
    expect = [
        i
        for i, ln in enumerate(text, start=1)
        if ln.startswith(("import pickle", "import cPickle", "import joblib", "from dill"))
        or "=" in ln
        and not ln.startswith(("#", '"'))
    ]
    missing = [f"{i}: {text[i - 1]}" for i in expect if i not in lines]
    assert not missing, "the scanner missed:\n" + "\n".join(missing)


def test_the_scanner_accepts_safe_code_and_mentions(tmp_path):
    good = tmp_path / "planted_good.py"
    good.write_text(PLANTED_GOOD)
    assert scan_source(good.read_text(), good.name) == []
