"""The one command line: runs an experiment config of any kind and writes its results to a
workdir::

    jaxsoftmax-run --config=feedback_digits --workdir=runs/feedback_digits
    jaxsoftmax-run --config=lm_unlearning --workdir=runs/lm_unlearning
    jaxsoftmax-run --config=multilabel_canvases --workdir=runs/multilabel_canvases
    python -m jaxsoftmax_experiments.run --config=feedback_digits --workdir=runs/short \\
        --config.steps=200 --config.regimes="('positive_only', 'complement_likelihood')"

``--config`` takes a config by name (``feedback_digits``, ``feedback_digits:hierarchical``,
from any directory) or a path to a config file. ``--help`` lists the flags and every
config key. A bad flag, an unknown config key or a value out of range exits with
status 2 and a message naming it, before anything is written.

The config's kind (:mod:`jaxsoftmax_experiments.kinds`) yields its state after every
evaluation; the driver (:mod:`jaxsoftmax_experiments.execute`) logs it, checkpoints it
every ``config.checkpoint_every`` steps and stops on Ctrl-C (a checkpoint, then exit
status 130). Rerunning the same command
resumes from the newest checkpoint that restores; rerunning a finished one says so and
changes nothing. A workdir holding a run of another config is refused, naming the keys
that differ, unless ``--overwrite`` is given.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from jaxsoftmax_experiments import execute

INTERRUPTED = execute.INTERRUPTED
_FLAGS = """\
  --config=NAME|PATH     a packaged config by name (feedback_digits, mnist1d_supervised:cnn)
                         or a config file; NAME:ARG passes ARG to its get_config
  --workdir=DIR          folder for the run's outputs (required)
  --overwrite            delete the run already in --workdir and start afresh
  --progress=false       no progress bar (one line per evaluation is printed instead
                         when the output is not a terminal)
  --num_devices=N        train on the first N devices; 0: all
  --compilation_cache=DIR  where compiled programs are kept for reruns (default:
                         $XDG_CACHE_HOME/jaxsoftmax/xla or ~/.cache/jaxsoftmax/xla);
                         --compilation_cache= turns it off
  --distributed          call jax.distributed.initialize first (one process per host), with
                         --coordinator_address, --num_processes and --process_id where the
                         cluster does not provide them
  --help                 this text"""


def _usage(
  argv: Sequence[str] = (), program: str = "jaxsoftmax-run", default_config: str | None = None
) -> str:
  """``--help``: the flags, the packaged configs and their variants, and the config keys
  (of the named config's kind only, when ``--config`` names one)."""
  from jaxsoftmax_experiments import config as config_lib
  from jaxsoftmax_experiments import configs

  kinds = config_lib.KINDS
  named = next((a[len("--config=") :] for a in argv if a.startswith("--config=")), None)
  if named:
    loaded = _load_quietly(named)
    if loaded is not None:
      kinds = (config_lib.kind_of(loaded),)
  alias = (
    f"{program} is jaxsoftmax-run with --config={default_config} unless --config is given.\n\n"
    if default_config
    else ""
  )
  return (
    f"usage: {program} --config=NAME|PATH --workdir=DIR [--config.KEY=VALUE ...]\n\n"
    f"{alias}Trains every regime x seed of an experiment config (a classifier, a language model "
    f"or a multi-label study) and writes config.json, metrics.jsonl, results.json, "
    f"timing.json, summary.md and curves.png to --workdir.\n\n"
    f"flags:\n{_FLAGS}\n\npackaged configs (--config=NAME):\n{_config_list(configs)}\n\n"
    f"config keys (override any as --config.KEY=VALUE; a config of one kind has its "
    f"kind's keys only):\n{config_lib.describe(kinds)}\n"
  )


def _config_list(configs) -> str:
  """Each packaged config with its variants (NAME:VALUE, from its module's ``VARIANTS``)
  and the first sentence of its docstring."""
  import ast

  out = []
  for name in configs.names():
    source = open(configs.path(name), encoding="utf-8").read()
    tree = ast.parse(source)
    variants = ""
    for node in tree.body:
      if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "VARIANTS" for t in node.targets
      ):
        values = ast.literal_eval(node.value)
        get = next(
          n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config"
        )
        arg = get.args.args[0].arg
        variants = (
          f" (variants {name}:{arg}, {arg} one of {', '.join(values)}; default {values[0]})"
        )
    out.append(f"  {name}{variants}: {_first_sentence(ast.get_docstring(tree) or '')}")
  return "\n".join(out)


def _first_sentence(doc: str) -> str:
  """The first sentence of a docstring's first paragraph, its lines joined."""
  paragraph = " ".join(doc.strip().split("\n\n")[0].split())
  end = re.search(r"\.\s+(?=[A-Z])", paragraph)  # not "et al. 2019"
  return paragraph if end is None else paragraph[: end.start() + 1]


def _load_quietly(arg: str):
  """The config ``--config=arg`` names, or None when it does not load."""
  import importlib.util

  path, _, rest = resolve_config_arg(arg).partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_jaxsoftmax_help_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([rest] if rest else []))
  except Exception:  # noqa: BLE001 - --help describes every kind then
    return None


def _default_cache() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxsoftmax", "xla")


def _flags(argv: list[str]):
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  # sys_argv: the overrides to define come from argv, not from the process's sys.argv.
  config_flags.DEFINE_config_file(
    "config", None, "Experiment config.", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "Folder for the run's outputs.", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Start afresh.", flag_values=fv)
  flags.DEFINE_boolean("progress", True, "Show a progress bar.", flag_values=fv)
  flags.DEFINE_integer("num_devices", 0, "Devices to use; 0: all.", lower_bound=0, flag_values=fv)
  flags.DEFINE_string(
    "compilation_cache", _default_cache(), "Persistent compilation cache.", flag_values=fv
  )
  flags.DEFINE_boolean("distributed", False, "jax.distributed.initialize first.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "Process 0's host:port.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)
  return fv


def resolve_config_arg(arg: str) -> str:
  """``--config=NAME[:ARG]`` names a packaged config; anything else is taken as a path."""
  from jaxsoftmax_experiments import configs

  name, colon, rest = arg.partition(":")
  packaged = None if "/" in name or name.endswith(".py") else configs.path(name)
  return packaged + colon + rest if packaged else arg


def _error(message: str) -> int:
  return execute.error(message)


def main(
  argv: Sequence[str] | None = None,
  program: str = "jaxsoftmax-run",
  default_config: str | None = None,
) -> int:
  """Parses ``argv`` (default ``sys.argv[1:]``), runs the experiment; returns the exit status.

  ``default_config`` is the config of a command that has one (``jaxsoftmax-lm``), used
  when ``argv`` names none."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if default_config and not any(a.startswith("--config=") for a in argv):
    argv.insert(0, f"--config={default_config}")
  if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv):
    print(_usage(argv, program, default_config))
    return 0
  interrupt = execute.Interrupt()
  with interrupt.installed():
    try:
      return _main(argv, interrupt, program)
    except KeyboardInterrupt:
      print(
        "\nInterrupted before the next checkpoint; rerun the same command to resume from "
        "the last one (if any).",
        file=sys.stderr,
      )
      return INTERRUPTED


def _last_override_wins(argv: list[str]) -> list[str]:
  """``argv`` with each ``--config.KEY=VALUE`` kept only where it is given last, so that a
  later override replaces an earlier one for every type (absl appends a tuple's values)."""

  def key(arg):
    return arg.partition("=")[0] if arg.startswith("--config.") and "=" in arg else None

  last = {key(a): i for i, a in enumerate(argv) if key(a)}
  return [a for i, a in enumerate(argv) if key(a) is None or last[key(a)] == i]


def parse(argv: list[str], program: str = "jaxsoftmax-run"):
  """The parsed flags and the config of a command line, or the exit status of an error
  (printed, naming the flag or key)."""
  from absl import flags

  from jaxsoftmax_experiments import config as config_lib

  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config."):
      key = arg[len("--config.") :].split("=")[0].split(".")[0]
      if key not in config_lib.ALL_KEYS:
        return _error(_unknown_key(key, argv))
    elif arg.startswith("--config="):
      value = arg[len("--config=") :]
      argv[i] = "--config=" + resolve_config_arg(value)
      name = value.partition(":")[0]
      if (
        argv[i] == arg and "/" not in name and not name.endswith(".py") and not os.path.exists(name)
      ):
        from jaxsoftmax_experiments import configs

        return _error(
          f"--config={value}: no packaged config of that name and no such file; "
          f"the packaged configs are {', '.join(configs.names())} (or give a path)."
        )
  argv = [program, *_last_override_wins(argv)]
  fv = _flags(argv)
  if not any(a.startswith("--config=") for a in argv) and any(
    a.startswith("--config.") for a in argv
  ):
    return _error(
      "--config.KEY=VALUE overrides need a config: add --config=NAME or "
      "--config=PATH (e.g. --config=feedback_digits)."
    )
  try:
    fv(argv)
  except (flags.Error, ValueError, TypeError, AttributeError, KeyError) as e:
    missing = re.fullmatch(r"\"?'([\w.]+)'\"?", str(e))
    if missing:  # an override of a key that the config file does not hold
      key = missing.group(1)
      named = next((a[len("--config=") :] for a in argv if a.startswith("--config=")), "")
      loaded = _load_quietly(named)
      kind = config_lib.kind_of(loaded) if loaded is not None else "classifier"
      owners = [k for k in config_lib.kinds_of(key.split(".")[0]) if k != kind]
      if owners and kind not in config_lib.kinds_of(key.split(".")[0]):
        return _error(
          f"--config.{key}: a key of kind {' and '.join(owners)}, not of this "
          f"config's kind {kind!r} (--help --config=... lists its keys)."
        )
      return _error(
        f"--config.{key}: the config has no such key; a config file starts from "
        "jaxsoftmax_experiments.config.defaults(KIND), which holds every key."
      )
    return _error(f"{_config_file_error(e)} (--help lists the flags and config keys).")
  except Exception as e:  # the config file itself: a syntax error, or get_config raising  # noqa: BLE001
    return _error(f"cannot load --config: {type(e).__name__}: {e}")
  if not fv["config"].present and fv["config"].value is None:
    return _error("--config is required, e.g. --config=feedback_digits.")
  if not fv.workdir:
    return _error("--workdir is required, e.g. --workdir=runs/feedback_digits.")
  try:
    config = fv.config
    if type(config).__name__ == "_ErrorConfig":  # absl's stand-in for a file that failed
      config.to_dict()  # to load raises that failure here
  except Exception as e:  # a missing config file, or one that raises  # noqa: BLE001
    return _error(f"cannot load --config: {type(e).__name__}: {e}")
  return fv, config


def _unknown_key(key: str, argv: list[str]) -> str:
  """The refusal of ``--config.KEY``: the named config's own keys, and the nearest."""
  import difflib

  from jaxsoftmax_experiments import config as config_lib

  named = next((a[len("--config=") :] for a in argv if a.startswith("--config=")), None)
  loaded = _load_quietly(named) if named else None
  kind = config_lib.kind_of(loaded) if loaded is not None else None
  keys = config_lib.KIND_KEYS[kind] if kind else config_lib.ALL_KEYS
  near = difflib.get_close_matches(key, keys, n=1)
  hint = f" Did you mean --config.{near[0]}?" if near else ""
  whose = f"the {kind} config's keys" if kind else "the keys"
  return (
    f"--config.{key}: unknown key.{hint} {whose[0].upper()}{whose[1:]} are "
    f"{', '.join(keys)} (--help describes each)."
  )


def _config_file_error(error: Exception) -> str:
  """ml_collections' error for a config file that raised holds the whole traceback: the
  flag and the exception's last line are what the user needs; absl's boolean parser
  gives a raw (message, value) tuple, said as a sentence."""
  text = str(error)
  pair = re.fullmatch(r"(flag [^:]+): \('([^']+)', '([^']*)'\)", text)
  if pair:  # absl's bool parser raises a (message, value) tuple
    boolean = " (true or false)" if "boolean" in pair.group(2) else ""
    return f"{pair.group(1)}: {pair.group(2).lower()}{boolean}"
  if "Error whilst parsing config file" in text and "Traceback" in text:
    head = text.split("Error whilst parsing config file")[0].strip().rstrip(":")
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return f"{head}: {last}"
  return text


def _main(argv: list[str], interrupt: execute.Interrupt, program: str) -> int:
  command = list(argv)  # as the user typed it, for the resume hint
  parsed = parse(argv, program)
  if isinstance(parsed, int):
    return parsed
  fv, config = parsed
  options = execute.Options(
    overwrite=fv.overwrite,
    progress=fv.progress,
    num_devices=fv.num_devices,
    compilation_cache=fv.compilation_cache,
    distributed=fv.distributed,
    distributed_args=(fv.coordinator_address, fv.num_processes, fv.process_id),
    command=command,
    program=program,
  )
  return execute.execute(config, fv.workdir, options, interrupt)


def _exit(code: int) -> None:
  if execute.WRITE_FAILED:  # the one message is out; Orbax's threads may report it again
    from jaxsoftmax_experiments.checkpoint import silence_stderr

    silence_stderr()
  sys.exit(code)


def cli() -> None:
  """The ``jaxsoftmax-run`` console script."""
  _exit(main())


if __name__ == "__main__":
  cli()


def lm_cli() -> None:
  """``jaxsoftmax-lm``: ``jaxsoftmax-run`` with ``--config=lm_repetition`` unless given."""
  _exit(main(program="jaxsoftmax-lm", default_config="lm_repetition"))


def multilabel_cli() -> None:
  """``jaxsoftmax-multilabel``: ``jaxsoftmax-run`` with ``--config=multilabel_canvases``
  unless given."""
  _exit(main(program="jaxsoftmax-multilabel", default_config="multilabel_canvases"))
