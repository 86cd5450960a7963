"""Evaluation: metrics with bootstrap CIs and calibration (``metrics``), the disease-blind shortcut
baseline (``shortcut``), plots (``plots``) and the evaluation run and its report (``report``)."""
