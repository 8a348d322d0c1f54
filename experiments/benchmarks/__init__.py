"""Benchmarks and demos, each a script: python -m jaxsoftmax_experiments.benchmarks.NAME."""
