"""The audit report shows calibration and prediction-set coverage when the data carry them."""

import numpy as np

from retrieval.audit.report import render_html
from retrieval.service import calibration as cal


def test_report_has_uncertainty_section_with_diagram():
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    rel = cal.reliability(p, y).to_json()
    data = {
        "calibration": {
            "ece_before": 0.2,
            "ece_after": 0.1,
            "temperature": 1.5,
            "reliability": {"before": rel, "after": rel},
        },
        "prediction_sets": {
            "coverage": 0.9,
            "coverage_ci95": [0.8, 0.95],
            "target_coverage": 0.9,
            "mean_size": 1.2,
            "calibrated_on": "the val split (10 cases)",
        },
    }
    page = render_html(data)
    sec = page[page.index("<h2>Uncertainty</h2>") :]
    assert "coverage 0.900" in sec and "0.200 before and 0.100 after" in sec
    assert 'alt="reliability diagram" src="data:image/png;base64,' in sec
    assert "<h2>Uncertainty</h2>" not in render_html({})  # old audit data: no section
