"""Tests of the annotator command line."""
