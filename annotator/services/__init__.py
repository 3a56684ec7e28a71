"""Project services: the operations a user performs, shared by the CLI and the web app.

Each operation takes an opened :class:`~annotator.services.project.Project`, reads and
writes through its store and on-disk caches, and calls the Bayesian core for the maths.
"""
