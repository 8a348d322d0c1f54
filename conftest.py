"""Doctests print arrays with four significant decimals, as the docstrings show them; the
session's runs, in process and in subprocesses, share one persistent compilation cache;
and the suite's programs are compiled with cheaper code generators (SUITE_XLA_FLAGS)."""

import gc
import importlib.util
import os

# The test extra installs libtpu (to compile for a TPU topology): JAX then tries to start a
# TPU unless told to use the CPU. Set before JAX is imported; subprocesses inherit it. A
# machine without libtpu (a GPU's) keeps its own platform.
if importlib.util.find_spec("libtpu") is not None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # The suite only compiles for a TPU topology (no chip is claimed): it shares libtpu with
  # any other process that has it loaded instead of failing on libtpu's machine-wide lock
  # (experiments/benchmarks/accelerator.py sets the same for its command).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

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

# Python's cyclic garbage collector, at its default thresholds, ran 3,000 times in
# tests/experiments/test_run.py alone, and each full pass walks JAX's caches of traced
# programs (millions of objects late in a module): 5.4 s of its 48 s. A collection after
# every 100,000 allocations instead of every 700 (and a full pass after 5,000 of those,
# where the default makes one after 100) ran 18 times there, in 2.7 s. Six modules
# (test_run, test_lm, test_masking, test_fused, test_kind_lm, test_workdir) on three
# workers took 311 s of CPU time and 164 s instead of 338 s and 180 s (the mean of two
# runs each). Only the test processes; the command line keeps Python's defaults.
gc.set_threshold(100_000, 50, 100)

# The modules that take longest, started first (largest first, each on one worker: the
# module fixtures are computed once), so that no worker is left running a long module
# while the others have finished: without this order, xdist starts the modules with the
# most tests first, and a 48 s module started last. Seconds are each module's sum of test
# times in a full run with three workers on this project's 2-core machine (at a13c53c:
# 1987 s in all, 687 s of wall time).
LONGEST_FIRST = (
  "tests/experiments/test_accelerator.py",  # 312 s: the TPU compiler
  "tests/experiments/test_judged.py",  # 172: twelve regimes' training in one program
  "tests/experiments/test_lm.py",  # 85
  "tests/experiments/test_mesh_kinds.py",  # 82
  "tests/experiments/test_kind_lm_feedback.py",  # 79
  "tests/experiments/test_workdir.py",  # 77
  "tests/experiments/test_run.py",  # 66
  "tests/test_docs.py",  # 62: the documentation build
  "tests/losses/test_tree.py",  # 62
  "tests/experiments/test_resume.py",  # 62
  "tests/losses/test_second_derivatives.py",  # 62
  "tests/losses/test_accuracy.py",  # 60
  "tests/experiments/test_kind_lm.py",  # 60
  "tests/losses/test_fused.py",  # 59
  "tests/losses/test_transforms.py",  # 56
  "tests/experiments/test_cli.py",  # 55
  "tests/losses/test_masking.py",  # 50
)


@pytest.hookimpl(wrapper=True)
def pytest_xdist_auto_num_workers(config):
  """``-n auto``: one worker more than xdist's own count (the machine's cores), unless
  ``PYTEST_XDIST_AUTO_NUM_WORKERS`` says how many. A worker often waits (on a subprocess
  it started, a signal, the documentation's notebook kernel), and the extra one uses that
  time: on this project's 2-core machine two workers kept the cores 92 % busy over the
  suite, three 96 % (CPU time over wall time, from ``time``)."""
  count = yield
  return count if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") else count + 1


def pytest_collection_modifyitems(config, items):
  missing = [name for name in LONGEST_FIRST if not (config.rootpath / name).is_file()]
  if missing:
    raise pytest.UsageError(f"conftest.py's LONGEST_FIRST names no test module: {missing}")
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


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


def pytest_sessionfinish(session):
  """In a worker, the last full garbage collection, made before the worker's report.

  pytest collects garbage once more as it closes (to report the exceptions that
  finalisers raise), and in an xdist worker that is after the worker has told the
  controller that it finished. With a third of the suite's JAX objects alive (about two
  million) that collection took 2.5 to 3.7 s per worker on this project's 2-core machine,
  and execnet interrupts a worker that has not ended 5 s after its report with a SIGINT:
  a KeyboardInterrupt traceback printed before the suite's summary. This hook runs inside
  xdist's own, before the report: it collects here, and ``gc.freeze`` leaves the last
  collection only what is allocated after it."""
  if os.environ.get("PYTEST_XDIST_WORKER"):
    gc.collect()
    gc.freeze()
