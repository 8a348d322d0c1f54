"""Checkpoints of a running experiment with Orbax: save every few steps, resume from the
newest one that restores.

A checkpoint holds a pytree of arrays (saved leaf by leaf, so any pytree of the
trainer's state fits, typed PRNG keys included) and a small JSON record of where the
experiment stood. Orbax writes each one to a temporary folder and renames it when
complete, so a process killed mid-save leaves the previous checkpoints intact. A
checkpoint whose files were damaged afterwards fails to restore: it is moved aside
with a warning and the next newest is used.

Each checkpoint's record carries the fingerprint of the config and data it belongs to;
:meth:`Checkpointer.restore_latest` refuses one of another fingerprint
(:class:`CheckpointError`) instead of resuming from it. A save that Orbax does not
carry out is an error too, never silent.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

MAX_TO_KEEP = 3
_LEAF = "{:05d}"


def is_ours(step_folder: Path) -> bool:
  """Whether a step folder has the layout this module's checkpoints have: Orbax's record
  of the step and the two items :meth:`Checkpointer.save` writes (``arrays`` and
  ``meta``), or is an Orbax temporary folder. A damaged one of ours still has them; a
  folder that merely has a step's name (a user's, in a linked ``checkpoints``) does not."""
  if ".orbax-checkpoint-tmp" in step_folder.name:
    return True
  return (
    (step_folder / "_CHECKPOINT_METADATA").is_file()
    and (step_folder / "meta").is_dir()
    and (step_folder / "arrays").is_dir()
  )


def _write_error(step: int, directory: Path, error: Exception) -> OSError:
  """An OSError for a checkpoint that could not be written: ENOSPC for a full disk (Orbax
  and TensorStore report one as RESOURCE_EXHAUSTED with the OS's words inside)."""
  if isinstance(error, OSError) and error.errno is not None:
    return error
  text = str(error)
  if "No space left on device" in text or "os_error_code='28'" in text:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
  first = text.splitlines()[0][:300] if text else type(error).__name__
  return OSError(errno.EIO, f"checkpoint {step} could not be written ({first})", str(directory))


class _Held:
  """Whether what a library printed to the standard error stream while held is replayed
  (the default) or dropped."""

  def __init__(self):
    self.dropped = False

  def drop(self) -> None:
    self.dropped = True


@contextlib.contextmanager
def _held_stderr():
  """Holds back everything written to the standard error stream while the block runs
  (Python's ``sys.stderr``, the ``absl`` log's, and C++ threads' writes to file descriptor
  2); replays it afterwards unless :meth:`_Held.drop` was called. Where no temporary file
  can be made (a full /tmp), the output goes through as it is."""
  sys.stderr.flush()
  try:
    file = tempfile.TemporaryFile()
  except OSError:
    yield _Held()
    return
  held, python = _Held(), io.StringIO()
  saved = os.dup(2)
  os.dup2(file.fileno(), 2)
  try:
    with contextlib.redirect_stderr(python):
      yield held
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    if not held.dropped:
      file.seek(0)
      replay = file.read()
      if replay:
        sys.stderr.flush()
        os.write(2, replay)
      sys.stderr.write(python.getvalue())
    file.close()


def silence_stderr() -> None:
  """Sends what is still written to the standard error stream to /dev/null, for a process
  that has printed its last message (Orbax's writer threads report a failed save again
  as the interpreter shuts down)."""
  sys.stderr.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)


class CheckpointWarning(UserWarning):
  """A checkpoint could not be restored and was moved aside."""


class CheckpointError(RuntimeError):
  """A checkpoint that must not be used or written; the message says why."""

  # Whether starting afresh (--overwrite) would resolve it: not for a folder that is not
  # this project's, which --overwrite leaves where it is too.
  overwrite_helps = True


class ForeignFolderError(CheckpointError):
  """A folder in the checkpoints folder that this project did not write."""

  overwrite_helps = False


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(x):
  """The PRNG implementation of a key array, or of an abstract one of the default kind."""
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  default = jax.random.key(0)
  if x.dtype != default.dtype:
    raise TypeError(
      f"cannot tell the PRNG implementation of an abstract {x.dtype} key; "
      "restore into a concrete key array."
    )
  return jax.random.key_impl(default)


def _to_leaves(tree) -> dict[str, jax.Array]:
  leaves = jax.tree.leaves(tree)
  return {
    _LEAF.format(i): jax.random.key_data(x) if _is_key(x) else x for i, x in enumerate(leaves)
  }


def _abstract(x):
  """What to restore a leaf as: its shape, dtype and sharding (key data for a key)."""
  if _is_key(x):
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


class Checkpointer:
  """An Orbax ``CheckpointManager`` in ``directory`` keeping the newest ``max_to_keep``.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp())
    >>> ckpt.save(10, {"w": jnp.ones(3)}, {"round": 0})
    >>> step, tree, meta = ckpt.restore_latest({"w": jnp.zeros(3)})
    >>> step, tree["w"].tolist(), meta
    (10, [1.0, 1.0, 1.0], {'round': 0})
    >>> ckpt.close()
  """

  def __init__(self, directory: str | Path, max_to_keep: int = MAX_TO_KEEP):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, tree, meta: dict[str, Any]) -> None:
    """Saves ``tree`` (a pytree of arrays) and ``meta`` (JSON) as checkpoint ``step``.

    Raises :class:`CheckpointError` if Orbax did not write it (it skips a step at or
    below its newest one), and an :class:`OSError` (``ENOSPC`` for a full disk) if the
    writing failed: Orbax's own reports of it (log lines and tracebacks from its writer
    threads, hundreds of lines for one full disk) are held back, so the caller's one
    message is what the user sees; after a save that succeeds they are printed as usual.
    """
    args = ocp.args.Composite(
      arrays=ocp.args.StandardSave(_to_leaves(tree)), meta=ocp.args.JsonSave(meta)
    )
    with _held_stderr() as held:
      try:
        saved = self.manager.save(step, args=args)
        self.manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001 -- Orbax reports a failed write in many types
        held.drop()
        raise _write_error(step, self.directory, e) from None
    if not saved or step not in self.manager.all_steps():
      raise CheckpointError(
        f"checkpoint {step} was not written to {self.directory} (it holds steps {self.steps()})."
      )

  def drop_after(self, step: int) -> list[int]:
    """Deletes this run's checkpoints newer than ``step`` (stale after resuming from it)."""
    stale = [s for s in self.steps() if s > step]
    for s in stale:
      self.manager.delete(s)
    self.manager.reload()
    return stale

  def restore_latest(
    self, target, usable: Callable[[dict], bool] = lambda meta: True, fingerprint: str | None = None
  ) -> tuple[int, Any, dict] | None:
    """The newest checkpoint that restores and whose meta passes ``usable``.

    Args:
      target: a pytree like the saved one; its leaves' shapes, dtypes and shardings
        say how to restore (abstract ``jax.ShapeDtypeStruct`` leaves work too).
      usable: a check of a checkpoint's meta; one that fails it is skipped (kept).
      fingerprint: when given, a checkpoint whose meta holds another ``fingerprint``
        raises :class:`CheckpointError`: it belongs to another run.

    Returns:
      ``(step, tree, meta)``, or None when no checkpoint restores. Each newer one
      that failed to restore is moved to ``<directory>-damaged/`` with a
      :class:`CheckpointWarning`.
    """
    leaves, treedef = jax.tree.flatten(target)
    abstract = {_LEAF.format(i): _abstract(x) for i, x in enumerate(leaves)}
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
          ),
        )
        arrays, meta = restored["arrays"], restored["meta"]
        if set(arrays) != set(abstract):
          raise ValueError(f"it holds {len(arrays)} arrays, the experiment {len(abstract)}")
      except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
        self._set_aside(step, e)
        continue
      if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
          f"checkpoint {step} in {self.directory} belongs to another config or dataset "
          f"(fingerprint {str(meta.get('fingerprint'))[:12]}, this run's {fingerprint[:12]})."
        )
      if not usable(meta):
        continue
      values = [
        jax.random.wrap_key_data(arrays[_LEAF.format(i)], impl=_key_impl(x))
        if _is_key(x)
        else arrays[_LEAF.format(i)]
        for i, x in enumerate(leaves)
      ]
      return step, jax.tree.unflatten(treedef, values), meta
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    folder = self.directory / str(step)
    if folder.is_symlink() or not is_ours(folder):
      raise ForeignFolderError(
        f"{folder} is not a checkpoint this project wrote (no Orbax record with arrays "
        "and meta), so it was left as it is: move it out of the checkpoints folder "
        "and rerun."
      ) from error
    damaged = self.directory.with_name(self.directory.name + "-damaged")
    if damaged.is_symlink():
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} could not be restored "
        f"({type(error).__name__}), and {damaged} is a symbolic link: "
        "nothing is moved through links; remove it and rerun."
      ) from error
    damaged.mkdir(exist_ok=True)
    destination = damaged / str(step)
    if destination.exists():
      shutil.rmtree(destination)
    shutil.move(str(folder), destination)
    self.manager.reload()
    warnings.warn(
      f"checkpoint {step} in {self.directory} could not be restored "
      f"({type(error).__name__}: {str(error)[:200]}); moved it to {destination} "
      f"and trying the previous one.",
      CheckpointWarning,
      stacklevel=3,
    )

  def close(self) -> None:
    self.manager.close()
