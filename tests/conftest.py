"""Shared fixtures: a private PHI key for the whole run, and small phantoms.

* ``CASEBASE_HOME`` points at a session temporary folder (and
  ``CASEBASE_PHI_KEY`` is unset) before any test runs, so no test reads or
  creates the real ``~/.config/casebase/phi.key``, and every hash made during
  the run uses one key.
* ``phantom_dir``: a 60-case, 64-pixel x-ray phantom (seed 0, no confounder).
* ``photo_phantom_dir``: the same for ``modality="photo"``.
* ``site_marker_phantom_dir``: 60 x-ray cases with ``--confounder site-marker``.

The phantom folders are shared by every test of the session: treat them as
read-only (copy them to ``tmp_path`` before changing anything).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ci_required import (  # noqa: F401 - hooks: browser/Orthanc/Ray skips fail under CI
    pytest_configure,
    pytest_runtest_makereport,
)


@pytest.fixture(scope="session", autouse=True)
def _casebase_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("casebase_home")
    saved = {k: os.environ.get(k) for k in ("CASEBASE_HOME", "CASEBASE_PHI_KEY")}
    os.environ["CASEBASE_HOME"] = str(home)
    os.environ.pop("CASEBASE_PHI_KEY", None)
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _isolated_casebase_home(_casebase_home, monkeypatch) -> Path:
    """Per test: CASEBASE_HOME stays the session folder even if a test changed the environment."""
    monkeypatch.setenv("CASEBASE_HOME", str(_casebase_home))
    monkeypatch.delenv("CASEBASE_PHI_KEY", raising=False)
    return _casebase_home


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory, _casebase_home) -> Path:
    from retrieval.data.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom_xray")
    make_phantom(out, n=60, size=64, seed=0, modality="xray")
    return out


@pytest.fixture(scope="session")
def photo_phantom_dir(tmp_path_factory, _casebase_home) -> Path:
    from retrieval.data.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom_photo")
    make_phantom(out, n=60, size=64, seed=0, modality="photo")
    return out


@pytest.fixture(scope="session")
def site_marker_phantom_dir(tmp_path_factory, _casebase_home) -> Path:
    from retrieval.data.phantom import make_phantom

    out = tmp_path_factory.mktemp("phantom_site_marker")
    make_phantom(out, n=60, size=64, seed=0, confounder="site-marker", strength=0.9)
    return out


# --- trained tiny models and indexes, shared by the service, explain, audit and app tests ---


def _train_and_index(root: Path, manifest: Path, epochs: int = 3) -> Path:
    from index.builder import build_index
    from retrieval.model.train import TrainOptions, train_model

    train_model(
        manifest, root / "model", TrainOptions(epochs=epochs, progress=False, num_workers=0)
    )
    build_index(root / "model", manifest, root / "index", progress=False)
    return root / "index"


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, phantom_dir) -> Path:
    """A 3-epoch model on the 60-case x-ray phantom and its index bundle (read-only)."""
    return _train_and_index(tmp_path_factory.mktemp("tiny_xray"), phantom_dir / "manifest.csv")


@pytest.fixture(scope="session")
def tiny_photo_index(tmp_path_factory, photo_phantom_dir) -> Path:
    """The same for the RGB photo phantom."""
    return _train_and_index(
        tmp_path_factory.mktemp("tiny_photo"), photo_phantom_dir / "manifest.csv"
    )
