"""Benchmarks and demos, each a script run from the repository's root:
``python -m experiments.benchmarks.NAME``. They are not installed with the package (the
wheel holds the library and the experiment framework); they import both as installed."""
