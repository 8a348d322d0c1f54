"""Doctests print arrays with four significant decimals, as the docstrings show them; the
session's runs, in process and in subprocesses, share one persistent compilation cache;
and the suite's programs are compiled with cheaper code generators (SUITE_XLA_FLAGS)."""

import importlib.util
import os

# The test extra installs libtpu (to compile for a TPU topology): JAX then tries to start a
# TPU unless told to use the CPU. Set before JAX is imported; subprocesses inherit it. A
# machine without libtpu (a GPU's) keeps its own platform.
if importlib.util.find_spec("libtpu") is not None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite's programs are tiny and run for a few steps: compiling them is most of its
# time. Two of XLA:CPU's code generators are swapped for cheaper ones in the tests (and,
# through the environment, their subprocesses): LLVM's optimisation passes are off (a
# sixth of the compile time), and fusions are emitted by the elemental emitter instead of
# the MLIR fusion emitters (half of what remained: 9.2 s -> 4.3 s of compiling for 40
# loss programs). XLA's own HLO passes, which decide what is materialised and fused,
# still run. Users' runs keep XLA's default, and the accuracy script's worst case is
# checked under it too (tests/losses/test_accuracy.py); its full table differs between
# the two in one row, by 0.02 ulps.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if SUITE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_printoptions(request):
  if isinstance(request.node, pytest.DoctestItem):
    with np.printoptions(precision=4):
      yield
  else:
    yield


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One XLA compilation cache in the session's temporary folder, shared by the workers:
  the many tiny runs compile the same programs (the command line's own cache stays off in
  the tests, ``--compilation_cache=``). Subprocesses find it through JAX's environment
  variables. Programs that compile in under 0.1 s are not written: few are compiled twice,
  and writing each of them cost more than it saved (tests/losses' test_masking and
  test_transforms took 84 s with every program written, 75 s with this threshold)."""
  import jax

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  jax.config.update("jax_compilation_cache_dir", str(root / "xla-cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(root / "xla-cache")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
  yield
