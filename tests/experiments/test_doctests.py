"""The examples in the experiment framework's docstrings run and print what they show.

pytest's ``--doctest-modules`` collects the source tree by path, and the experiments'
source folder (``experiments/``) installs under another name; the installed modules are
run here instead, so each is imported once, under its own name."""

import doctest
import importlib
import pkgutil

import pytest

import jaxsoftmax_experiments

MODULES = sorted(
  m.name
  for m in pkgutil.walk_packages(jaxsoftmax_experiments.__path__, "jaxsoftmax_experiments.")
  if ".benchmarks." not in m.name
)


def _examples(name):
  return [t for t in doctest.DocTestFinder().find(importlib.import_module(name)) if t.examples]


def test_the_modules_with_examples_are_found():
  with_examples = [n for n in MODULES if _examples(n)]
  # The two that hold examples today (found by hand); a new one joins on its own.
  assert {"jaxsoftmax_experiments.checkpoint", "jaxsoftmax_experiments.parallel"} <= set(
    with_examples
  )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in _examples(name):
    runner.run(test)
  assert runner.failures == 0, f"{runner.failures} failing example(s) in {name}"
