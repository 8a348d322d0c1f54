"""The classifier kind through the one command line: the tests of :mod:`kinds_common`."""

from kinds_common import *  # noqa: F403 - the shared tests and their fixture
from kinds_common import workdir_lib

KIND = "classifier"


def test_overwrite_through_a_linked_checkpoints_folder_keeps_folders_it_did_not_write(
  finished, tmp_path
):
  import shutil

  _, _, source, _ = finished
  outside = tmp_path / "outside"
  shutil.copytree(source / "checkpoints", outside)  # this project's checkpoints, 10 and 20
  for step in ("40", "60", "80"):
    (outside / step).mkdir()
    (outside / step / "data.bin").write_bytes(b"not ours")
  workdir = tmp_path / "linked"
  workdir.mkdir()
  (workdir / "checkpoints").symlink_to(outside)
  (workdir / "results.json").write_text("{}")
  workdir_lib.Workdir(workdir).clear()  # what --overwrite does first
  assert (workdir / "checkpoints").is_symlink() and not (workdir / "results.json").exists()
  assert sorted(p.name for p in outside.iterdir()) == ["40", "60", "80"]  # before: all deleted
  assert all((outside / s / "data.bin").read_bytes() == b"not ours" for s in ("40", "60", "80"))


def test_a_classifier_checkpoint_keeps_the_fingerprint_it_had_before_there_were_kinds(finished):
  import hashlib
  import json

  from jaxsoftmax_experiments import data

  _, _, source, _ = finished
  # Reference: the fingerprint as jaxsoftmax 0.1.0 at 2af9fba defined it (config, then each
  # split's shape, dtype and bytes, then the class count), so its runs still resume.
  resolved = json.loads((source / "config.json").read_text())
  dataset = data.load(resolved["dataset"])
  h = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode())
  for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
    h.update(str(a.shape).encode() + str(a.dtype).encode())
    h.update(a.tobytes())
  h.update(str(dataset.num_classes).encode())
  meta = json.loads(next((source / "checkpoints").glob("*/meta/metadata")).read_text())
  assert meta["fingerprint"] == h.hexdigest()
