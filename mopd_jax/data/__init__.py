"""Prompt data: file sources, grain pipelines, built-in synthetic domains, reward functions."""
