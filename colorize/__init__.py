"""Colourise grayscale clips: inference pipeline, CPU baselines, metrics, frame I/O and reports."""
