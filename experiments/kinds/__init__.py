"""The kinds of experiment the framework runs: each brings its data, model and metrics."""
