"""Tests of the Bayesian core."""
