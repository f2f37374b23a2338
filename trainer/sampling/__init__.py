"""Sampling: the text-to-image pipeline and its samplers."""
