"""The habits of a published library, each checked here: the linter and the formatter pass
on the tree, the type checker on ``jaxsoftmax/``, and the built wheel and sdist install
into a fresh virtual environment and import (the configs, the notebook and ``py.typed``
inside, no test or benchmark code)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command, cwd=ROOT, both=False, **kwargs):
  """The command's stdout (with ``both``, stdout and stderr), once it has succeeded."""
  done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
  assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
  return done.stdout + done.stderr if both else done.stdout


def test_ruff_lints_and_formats_the_tree_clean():
  _run(sys.executable, "-m", "ruff", "check", ".")
  _run(sys.executable, "-m", "ruff", "format", "--check", ".")


def test_mypy_accepts_the_library():
  out = _run(sys.executable, "-m", "mypy", "--no-incremental")  # files: pyproject.toml
  assert "Success: no issues found" in out, out


def test_one_version_string():
  import tomllib

  import jaxsoftmax

  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert "version" not in project and "version" in project["dynamic"]
  assert (ROOT / "CHANGELOG.md").read_text().count(f"## {jaxsoftmax.__version__}") == 1


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  # The sdist, then the wheel built from it (build's default: what the sdist lacks, the
  # wheel lacks too, and no stale build/ folder of a checkout leaks in); --no-isolation:
  # the build backend the test extra installed, nothing downloaded.
  log = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), both=True)
  (wheel,) = out.glob("*.whl")
  (sdist,) = out.glob("*.tar.gz")
  return wheel, sdist, log


def test_the_build_warns_of_nothing(built):
  # Before: every install printed two of setuptools' warnings, `project.license` as a TOML
  # table is deprecated, and the notebooks folder "is absent from the `packages`
  # configuration" (Python could import it as a namespace package), each a box of 30 lines.
  *_, log = built
  # build prints the backend's warnings as "WARNING ..." lines (pip as "...Warning: ...").
  warnings = [l for l in log.splitlines() if "WARNING" in l or "Warning" in l]
  assert not warnings, "\n".join(warnings)


def test_the_wheel_holds_the_packages_and_their_data_and_no_tests_or_benchmarks(built):
  wheel, *_ = built
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert tops == {"jaxsoftmax", "jaxsoftmax_experiments"}, tops
  assert "jaxsoftmax/py.typed" in names
  assert "jaxsoftmax_experiments/configs/feedback_digits.py" in names
  assert "jaxsoftmax_experiments/notebooks/losses.ipynb" in names
  # The license: its file, and its SPDX name in the metadata (pyproject.toml's license).
  assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")], names
  (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
  assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
  assert not [n for n in names if "/benchmarks/" in n or "/tests/" in n or "test_" in n]


def _fresh_venv(path: Path) -> Path:
  """A new virtual environment that finds the dependencies (jax, flax, ...) of the one
  running the tests through a .pth line after its own site-packages: whatever it imports
  of jaxsoftmax comes from what was installed into it."""
  _run(sys.executable, "-m", "venv", "--without-pip", str(path))
  python = path / "bin" / "python"
  site = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # Every site folder this interpreter reads, also those that reach it through .pth lines.
  outer = [
    p for p in sys.path if Path(p).is_dir() and Path(p).name in ("site-packages", "dist-packages")
  ]
  Path(site.strip(), "outer.pth").write_text("".join(f"{p}\n" for p in outer))
  return python


CHECK = """
import importlib.resources, pathlib, sys, jaxsoftmax, jaxsoftmax_experiments
from jaxsoftmax_experiments import run
prefix = pathlib.Path(sys.prefix).resolve()
for module in (jaxsoftmax, jaxsoftmax_experiments):
  assert prefix in pathlib.Path(module.__file__).resolve().parents, module.__file__
assert pathlib.Path(run.resolve_config_arg("feedback_digits")).is_file()
assert importlib.resources.files("jaxsoftmax").joinpath("py.typed").is_file()
print(jaxsoftmax.__version__)
"""


@pytest.mark.parametrize("which", ["wheel", "sdist"])
def test_the_wheel_and_the_sdist_install_into_a_fresh_venv_and_import(built, which, tmp_path):
  import jaxsoftmax

  python = _fresh_venv(tmp_path / "venv")
  artifact = built[0] if which == "wheel" else built[1]
  # Offline, with this environment's pip aimed at the fresh one (--python; with --prefix
  # it would first uninstall this environment's jaxsoftmax), --ignore-installed (through
  # the .pth line pip sees this environment's jaxsoftmax and would call it satisfied). The
  # sdist is built with the setuptools the fresh environment sees through that line.
  _run(
    sys.executable,
    "-m",
    "pip",
    "--python",
    str(python),
    "install",
    "--quiet",
    "--no-deps",
    "--no-index",
    "--no-build-isolation",
    "--ignore-installed",
    str(artifact),
    cwd=tmp_path,
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = _run(str(python), "-c", CHECK, cwd=tmp_path, env=env)
  assert out.strip().splitlines()[-1] == jaxsoftmax.__version__
  assert (tmp_path / "venv" / "bin" / "jaxsoftmax-run").is_file()
