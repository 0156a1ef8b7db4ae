"""The run report: one self-contained HTML page about a finished sweep (``RUN_DIR/report.html``).

It shows the leaderboard, every trial's learning curves with early stops marked, how validation accuracy
depends on the hyperparameters (Optuna's PED-ANOVA importances and scatter plots), the served ensemble
against the best single trial, the confusion matrix, per-class metrics, a reliability diagram, the most
confidently misclassified test images, where the model looked (Grad-CAM overlays
of its mistakes and right answers) and a note on trials whose train and validation curves diverge.
Charts are inline SVG and thumbnails data URIs, so the file opens anywhere, offline. Only files are read
(no Ray); the thumbnails and test reliability run the saved artifact once over the test split.

    .venv/bin/automl-tl report runs/my_run
    .venv/bin/python -c "from automl_tl.report import write_report; print(write_report('runs/my_run'))"
"""

from __future__ import annotations

from automl_tl.report._page import REPORT_NAME, SECTIONS, write_report

__all__ = ["REPORT_NAME", "SECTIONS", "write_report"]
