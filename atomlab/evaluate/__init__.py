"""Evaluation: held-out bits per byte, samples, and the run's report card."""
