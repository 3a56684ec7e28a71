"""The ``annotator`` command line."""
