"""Data in: image discovery and validation, the feature cache, labelled datasets, demo data.

Import the modules directly (``annotator.data.images``, ``annotator.data.datasets``,
``annotator.data.features``) so that reading a CSV does not load the feature cache's machinery.
"""
