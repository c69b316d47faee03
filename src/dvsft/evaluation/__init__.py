"""Evaluation: benchmarks, lmms-eval-exact metrics, OCR tasks."""
