"""Benchmarks of annotator's hot paths, run by `annotator bench`."""
