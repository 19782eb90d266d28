"""The "I don't know" sentence shows OOD scores with enough digits to compare them."""

from retrieval.service.results import OODResult, Prediction, QueryResult
from retrieval.service.retriever import CaseRetriever


def _text(score: float, threshold: float) -> str:
    res = QueryResult(
        Prediction("mass", {"mass": 0.9, "nodule": 0.1}),
        {"mass": 1.0},
        OODResult(score, score > threshold, threshold),
        [],
        "",
    )
    return CaseRetriever.describe(None, res)  # describe reads only the result


def test_small_ood_scores_are_readable():
    text = _text(0.0043, 0.0041)
    assert text.startswith("I don't know")
    assert "0.0043" in text and "0.0041" in text  # at 2 decimals both read 0.00
    assert "0.00 " not in text


def test_score_and_threshold_differ_in_the_text_when_they_differ():
    for score, thr in ((0.057, 0.018), (0.25, 0.2), (1.37, 1.2), (0.00431, 0.00429)):
        text = _text(score, thr)
        s = text.split("OOD score ")[1].split(" ")[0]
        t = text.split("calibrated ")[1].split(")")[0]
        assert s != t and float(s) > float(t), (score, thr, text)
