"""Writes to the provider catalog, one module a topic: ``health``, ``model_import``, ``encryption`` and
``catalog_file``."""
