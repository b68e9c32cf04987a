"""Scaling laws, their fit, and compute-optimal planning. numpy/scipy only: never imports torch."""
