"""The suite's own machinery in the root conftest.py, run as the README's test command
runs it: in xdist workers."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_worker_whose_last_garbage_collection_is_slow_ends_without_a_keyboardinterrupt(
  tmp_path,
):
  # Before: the suite's output ended with "Exception ignored in: <function
  # WeakKeyDictionary...remove>" and a KeyboardInterrupt traceback, before its summary.
  # pytest collects garbage once more as a worker closes, after the worker has reported
  # that it finished; with a third of the suite's JAX objects that took 2.5 to 3.7 s per
  # worker on this project's 2-core machine, and execnet interrupts a worker that has not
  # ended 5 s after that report with a SIGINT, which lands in whatever the collection runs.
  # Here the last collection frees a cycle whose finaliser takes 6 s.
  (tmp_path / "conftest.py").write_text(
    textwrap.dedent(f"""
      import importlib.util
      path = {str(ROOT / "conftest.py")!r}
      spec = importlib.util.spec_from_file_location("project_conftest", path)
      project = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(project)
      pytest_sessionfinish = project.pytest_sessionfinish
    """)
  )
  (tmp_path / "test_slow_garbage.py").write_text(
    textwrap.dedent("""
      import time

      class SlowToFree:
        def __del__(self):
          time.sleep(6)

      def test_leaves_a_cycle_with_a_slow_finaliser():
        cycle = SlowToFree()
        cycle.itself = cycle
    """)
  )
  done = subprocess.run(
    [sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider", str(tmp_path)],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  out = done.stdout + done.stderr
  assert done.returncode == 0, out[-3000:]
  assert "1 passed" in out, out[-3000:]
  assert "KeyboardInterrupt" not in out and "Exception ignored" not in out, out[-3000:]
