import json

import pytest

from index import bundle
from retrieval.cli import main
from retrieval.model.network import save_model
from retrieval.service.retriever import CaseRetriever
from tests.retrieval.explain.conftest import tiny_model


@pytest.fixture
def index_dir(tmp_path, phantom_dir):
    from index.builder import build_index

    save_model(tiny_model(), tmp_path / "model")
    build_index(
        tmp_path / "model",
        phantom_dir / "manifest.csv",
        tmp_path / "index",
        device="cpu",
        progress=False,
        num_workers=0,
    )
    return tmp_path / "index"


def test_explain_eval_prints_json_stores_trust_and_queries_carry_it(index_dir, phantom_dir, capsys):
    manifest = str(phantom_dir / "manifest.csv")
    rc = main(
        [
            "explain-eval",
            str(index_dir),
            manifest,
            "--methods",
            "gradcam,similarity",
            "--max-cases",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "test" and report["n_cases"] == 2
    assert set(report["methods"]) == {"gradcam", "similarity"}
    for m in report["methods"].values():
        for key in (
            "pointing_game",
            "pointing_game_strict",
            "mask_energy",
            "mask_area",
            "deletion_auc",
            "deletion_auc_random",
            "insertion_auc",
            "insertion_auc_random",
            "randomization_spearman",
            "randomization_ssim",
            "sanity_check",
            "n_cases",
            "seconds_per_map",
            "summary",
        ):
            assert key in m
    bundle.verify(index_dir)  # trust.json was added atomically, checksummed
    stored = json.loads((index_dir / "trust.json").read_text())
    assert set(stored) == {"gradcam", "similarity"}

    # --no-store leaves the bundle alone; a later run merges with what was measured before
    before = (index_dir / "trust.json").read_bytes()
    assert (
        main(
            [
                "explain-eval",
                str(index_dir),
                manifest,
                "--methods",
                "gradient",
                "--max-cases",
                "1",
                "--no-store",
            ]
        )
        == 0
    )
    assert (index_dir / "trust.json").read_bytes() == before
    table = capsys.readouterr().out
    assert "gradient" in table and "pointing game" in table
    assert (
        main(
            ["explain-eval", str(index_dir), manifest, "--methods", "gradient", "--max-cases", "1"]
        )
        == 0
    )
    assert set(json.loads((index_dir / "trust.json").read_text())) == {
        "gradcam",
        "similarity",
        "gradient",
    }

    r = CaseRetriever.load(index_dir, device="cpu")
    img = str(phantom_dir / r.cases["image"].iloc[0])
    res = r.query(img, k=2, explain=["gradcam"])
    assert set(res.trust) == {"gradcam"}
    assert "pointing game" in res.trust["gradcam"]["summary"]
    assert res.to_json()["trust"]["gradcam"]["sanity_check"] in ("pass", "fail")


def test_explain_eval_user_errors(index_dir, phantom_dir, capsys):
    manifest = str(phantom_dir / "manifest.csv")
    assert main(["explain-eval", str(index_dir), manifest, "--methods", "gradcam,magic"]) == 2
    err = capsys.readouterr().err
    assert "magic" in err and "occlusion" in err
    assert main(["explain-eval", str(index_dir), manifest, "--split", "nosuchsplit"]) == 2
    assert "no cases in split" in capsys.readouterr().err
