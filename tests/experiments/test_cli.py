"""The command line as a newcomer meets it: --help, configs by name from anywhere, a
finished run left alone, Ctrl-C while compiling, progress in a log, and a user's data."""

import importlib.metadata
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from kinds_common import TINY_CLASSIFIER

from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import run

ROOT = Path(__file__).resolve().parents[2]
TINY = [*TINY_CLASSIFIER, "--progress=false", "--compilation_cache="]


def _files(workdir):
  return {p.relative_to(workdir): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_help_lists_the_flags_and_every_config_key_with_its_default(capsys):
  # Before: exit 2 with "Unknown command line flag 'help'".
  assert run.main(["--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--config=", "--workdir=", "--overwrite", "--num_devices", "--compilation_cache"):
    assert flag in out
  defaults = config_lib.defaults()
  for key in config_lib.KEYS:
    line = next(l for l in out.splitlines() if l.strip().startswith(f"--config.{key} "))
    assert f"(default: {defaults[key]!r})" in line
  assert "feedback_digits" in out and "mnist1d_supervised" in out


def test_the_console_script_answers_help():
  script = Path(sys.executable).with_name("jaxsoftmax-run")
  out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and "--config.learning_rate" in out.stdout


def test_installing_claims_no_generic_top_level_name():
  # Before: `pip install .` put a package named `experiments` into site-packages. The
  # distribution's own record says what it installs, wherever the test runs from (the
  # repo root holds source folders named experiments/ and configs/).
  dist = importlib.metadata.distribution("jaxsoftmax")
  top = (dist.read_text("top_level.txt") or "").split()
  if not top:  # an editable install without top_level.txt: its RECORD's names
    top = sorted(
      {
        str(f).split("/")[0].removesuffix(".py")
        for f in dist.files or ()
        if not str(f).startswith(("jaxsoftmax-", "__editable__", ".."))
      }
    )
  assert set(top) <= {"jaxsoftmax", "jaxsoftmax_experiments"}, top
  assert importlib.util.find_spec("jaxsoftmax_experiments") is not None
  assert importlib.util.find_spec("jaxsoftmax_experiments.configs") is not None


def test_packaged_configs_are_found_through_the_package_not_the_source_tree():
  from jaxsoftmax_experiments import configs

  assert {"feedback_digits", "mnist1d_supervised"} <= set(configs.names())
  assert configs.path("feedback_digits").endswith("feedback_digits.py")
  assert configs.path("none") is None


def test_a_config_by_name_runs_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ folder here
  assert run.main(["--config=feedback_digits:hierarchical", "--workdir=out", *TINY]) == 0
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert results["config"]["head"] == "hierarchical"
  path = ROOT / "configs" / "feedback_digits.py"
  assert run.main([f"--config={path}", "--workdir=by_path", *TINY]) == 0  # a path works too


def test_rerunning_a_finished_run_changes_nothing(tmp_path, capsys):
  workdir = tmp_path / "done"
  assert run.main(["--config=feedback_digits", f"--workdir={workdir}", *TINY]) == 0
  before = _files(workdir)
  capsys.readouterr()
  assert run.main(["--config=feedback_digits", f"--workdir={workdir}", *TINY]) == 0
  out = capsys.readouterr().out
  assert "is complete" in out and "resuming" not in out.lower()
  assert _files(workdir) == before  # timing.json and summary.md included
  # More steps on a finished run: refused, saying so and naming --overwrite.
  assert (
    run.main(["--config=feedback_digits", f"--workdir={workdir}", *TINY, "--config.steps=40"]) == 2
  )
  err = capsys.readouterr().err
  assert "cannot be continued with more steps" in err and "--overwrite" in err
  assert _files(workdir) == before


def test_ctrl_c_while_compiling_prints_one_line_and_exits_130(tmp_path):
  workdir = tmp_path / "early"
  # Far more steps than it can take before the signal: a loaded machine may otherwise
  # finish the tiny run between config.json appearing and the signal (exit 0).
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "jaxsoftmax_experiments.run",
      "--config=feedback_digits",
      f"--workdir={workdir}",
      *TINY,
      "--config.steps=100000",
      "--config.initial_steps=100000",
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 180  # a generous bound: the other workers may be compiling
  while not (workdir / "config.json").exists():  # past flag parsing: loading, compiling
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"no config.json; exit status {proc.poll()}: {proc.communicate()[1][-2000:]}")
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == run.INTERRUPTED
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and "Interrupted" in lines[0], err


def _run_with_a_ctrl_c_dropped_in_a_gc_callback(monkeypatch, workdir):
  """The tiny classifier run, with a Ctrl-C raised inside a garbage collector callback
  while it plans (where Python drops the KeyboardInterrupt); its exit status."""
  import gc

  from jaxsoftmax_experiments import kinds

  module = kinds.get("classifier")
  real = module.plan

  def in_gc(phase, info):
    if phase == "start":
      signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the gc callback

  def plan(*args, **kwargs):
    gc.callbacks.append(in_gc)
    try:
      gc.collect()
    finally:
      gc.callbacks.remove(in_gc)
    return real(*args, **kwargs)

  monkeypatch.setattr(module, "plan", plan)
  return run.main(["--config=feedback_digits", f"--workdir={workdir}", *TINY])


def test_a_ctrl_c_that_python_drops_in_a_gc_callback_still_stops_the_run(
  tmp_path, monkeypatch, capsys
):
  # Before: a Ctrl-C whose KeyboardInterrupt was raised inside JAX's garbage collector
  # callback was printed as "Exception ignored in: <function _xla_gc_callback>" with a
  # KeyboardInterrupt traceback, and lost: the run trained on (seen in
  # test_ctrl_c_while_compiling, which then timed out waiting for the exit).
  workdir = tmp_path / "dropped"
  assert _run_with_a_ctrl_c_dropped_in_a_gc_callback(monkeypatch, workdir) == run.INTERRUPTED
  err = capsys.readouterr().err
  assert "Exception ignored" not in err and "Traceback" not in err, err
  assert "Interrupted" in err and not (workdir / "results.json").exists()


def test_a_dropped_ctrl_c_whose_resent_signal_is_lost_too_still_stops_the_run(
  tmp_path, monkeypatch, capsys
):
  # Before: the run relied on the signal sent again from another thread; in one CI run of
  # the test above, that one was lost as well (wherever it landed) and the run trained to
  # the end and returned 0. Here it is lost on purpose: the loop's own check stops the run.
  from jaxsoftmax_experiments import execute

  monkeypatch.setattr(execute.Interrupt, "_send_again", lambda self: None)
  workdir = tmp_path / "lost"
  assert _run_with_a_ctrl_c_dropped_in_a_gc_callback(monkeypatch, workdir) == run.INTERRUPTED
  err = capsys.readouterr().err
  assert "Exception ignored" not in err and "Traceback" not in err, err
  assert "Interrupted" in err and not (workdir / "results.json").exists()


def test_an_interrupt_sent_again_as_the_command_returns_reaches_no_one_after_it(monkeypatch):
  # Before: the thread that sends a dropped Ctrl-C again checked that the command was still
  # running and then sent it; a command that returned in between had put the previous
  # SIGINT handler back, which got the signal: in a notebook or a test process, a
  # KeyboardInterrupt raised wherever the program had got to. Here the sending is slowed
  # down (0.3 s) to make that window wide.
  import threading
  import types

  from jaxsoftmax_experiments import execute

  sending, real = threading.Event(), signal.raise_signal

  def slow_raise_signal(signum):
    sending.set()
    time.sleep(0.3)
    real(signum)

  monkeypatch.setattr(signal, "raise_signal", slow_raise_signal)
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    interrupt = execute.Interrupt()
    with interrupt.installed():
      sys.unraisablehook(types.SimpleNamespace(exc_value=KeyboardInterrupt()))  # dropped
      assert sending.wait(10)  # the command returns while the signal is on its way
    time.sleep(0.5)  # the signal, had it been sent after, would have been handled by now
  finally:
    signal.signal(signal.SIGINT, previous)
  assert received == []


def test_progress_in_a_log_is_one_line_per_evaluation_counting_the_asked_steps(tmp_path):
  args = [a for a in TINY if a != "--progress=false"]
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxsoftmax_experiments.run",
      "--config=feedback_digits",
      f"--workdir={tmp_path / 'log'}",
      *args,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("step ")]
  # Evaluations at steps 0, 10 and 20 of the 20 asked for (the initial model's 20 not counted).
  assert [l.split(":")[0] for l in lines] == ["step 0/20", "step 10/20", "step 20/20"]
  assert "\r" not in out.stderr and max(map(len, out.stderr.splitlines())) < 200


# --- a user's own data ------------------------------------------------------------------


def _npz(path, **arrays):
  rng = np.random.default_rng(0)
  base = {
    "x_train": rng.normal(size=(60, 4)).astype(np.float32),
    "y_train": rng.integers(0, 3, 60),
    "x_test": rng.normal(size=(30, 4)).astype(np.float32),
    "y_test": rng.integers(0, 3, 30),
  }
  base.update(arrays)
  np.savez(path, **{k: v for k, v in base.items() if v is not None})
  return f"--config.dataset=npz:{path}"


def test_a_users_npz_file_runs_the_feedback_experiment(tmp_path):
  flag = _npz(tmp_path / "mine.npz", num_classes=np.int64(4))
  workdir = tmp_path / "mine"
  args = [a for a in TINY if not a.startswith("--config.dataset")]
  assert (
    run.main(
      ["--config=feedback_digits", f"--workdir={workdir}", flag, *args, "--config.num_labeled=20"]
    )
    == 0
  )
  results = json.loads((workdir / "results.json").read_text())
  assert (results["num_train"], results["num_test"]) == (60, 30)
  r = results["regimes"]["complement_likelihood"]
  assert [p + n for p, n in zip(r["num_positive"], r["num_negative"])] == [60, 60]


@pytest.mark.parametrize(
  "arrays, message",
  [
    ({"y_test": None}, "has no y_test"),
    ({"x_test": np.zeros((30, 5), np.float32)}, "x_test inputs have shape (5,), x_train's (4,)"),
    ({"y_train": np.zeros(59, np.int64)}, "y_train has shape (59,)"),
    ({"y_train": np.zeros(60, np.float32)}, "y_train must hold integer labels"),
    ({"x_train": np.full((60, 4), np.nan, np.float32)}, "x_train[0, 0] = nan is not finite"),
    ({"y_test": np.full(30, 7), "num_classes": np.int64(3)}, "y_test[0] = 7 is outside [0, 3)"),
    ({"x_train": np.array(["a"] * 60)}, "x_train must hold real numbers"),
  ],
)
def test_a_bad_npz_file_is_named_and_nothing_is_written(tmp_path, capsys, arrays, message):
  flag = _npz(tmp_path / "bad.npz", **arrays)
  workdir = tmp_path / "out"
  assert run.main(["--config=feedback_digits", f"--workdir={workdir}", flag, *TINY[1:]]) == 2
  assert message in capsys.readouterr().err
  assert not workdir.exists()


def test_a_missing_npz_file_is_named(tmp_path, capsys):
  assert (
    run.main(
      [
        "--config=feedback_digits",
        f"--workdir={tmp_path / 'out'}",
        f"--config.dataset=npz:{tmp_path / 'none.npz'}",
        *TINY[1:],
      ]
    )
    == 2
  )
  assert "cannot read" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_several_negatives_per_input_train_as_one_set(tmp_path, capsys):
  workdir = tmp_path / "sets"
  assert (
    run.main(
      [
        "--config=feedback_digits",
        f"--workdir={workdir}",
        *TINY,
        "--config.protocol=uniform",
        "--config.num_negatives=3",
      ]
    )
    == 0
  )
  results = json.loads((workdir / "results.json").read_text())
  for r in results["regimes"].values():  # 50 labeled, 450 negative examples of 3 labels each
    assert (r["num_positive"], r["num_negative"]) == ([50, 50], [450, 450])
  assert results["config"]["num_negatives"] == 3
  assert (
    run.main(
      [
        "--config=feedback_digits",
        f"--workdir={tmp_path / 'no'}",
        *TINY,
        "--config.num_negatives=3",
      ]
    )
    == 2
  )
  assert (
    "config.num_negatives: several wrong labels per input need protocol" in capsys.readouterr().err
  )
  assert (
    run.main(
      [
        "--config=feedback_digits",
        f"--workdir={tmp_path / 'no'}",
        *TINY,
        "--config.protocol=uniform",
        "--config.num_negatives=5",
      ]
    )
    == 2
  )
  assert "must be at most the 4 wrong labels" in capsys.readouterr().err


def test_help_names_every_variant_and_whole_sentences(capsys):
  # Before: feedback_digits listed only softmax (hierarchical and tree run), mnist1d only
  # mlp (cnn runs), and two descriptions stopped mid-sentence ("(Welleck et al.").
  assert run.main(["--help"]) == 0
  out = capsys.readouterr().out
  configs = out.split("packaged configs (--config=NAME):\n")[1].split("\n\n")[0].splitlines()
  assert "head one of softmax, hierarchical, tree; default softmax" in out
  assert "model one of mlp, cnn; default mlp" in out
  assert len(configs) == 7 and all(line.rstrip().endswith(".") for line in configs), configs
  assert "Token unlikelihood against repetition (Welleck et al. 2019), from a random start." in out


@pytest.mark.parametrize(
  "program, config",
  [("jaxsoftmax-lm", "lm_repetition"), ("jaxsoftmax-multilabel", "multilabel_canvases")],
)
def test_the_short_commands_help_names_their_config(capsys, program, config):
  assert run.main(["--help"], program=program, default_config=config) == 0
  assert f"{program} is jaxsoftmax-run with --config={config} unless --config is given." in (
    capsys.readouterr().out
  )


def test_a_mistyped_key_gets_the_nearest_and_only_its_kinds_keys(tmp_path, capsys):
  # Before: 43 keys, 14 of them other kinds', and no suggestion.
  assert run.main(["--config=feedback_digits", "--config.step=300", f"--workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert "Did you mean --config.steps?" in err
  listed = err.split("keys are ")[1].split(" (--help")[0].split(", ")
  assert listed == list(config_lib.KIND_KEYS["classifier"])
  assert "vocab_chunk" not in err  # a language-model key


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=feedback_digits", "--config.feedback_sets=maybe"],
      "flag --config.feedback_sets=maybe: non-boolean argument to boolean flag (true or false)",
    ),
    (
      ["--config=feedback_digits:sigmoid"],
      "head must be one of softmax, hierarchical, tree, got 'sigmoid'.",
    ),
  ],
)
def test_bad_values_are_one_sentence(tmp_path, capsys, args, message):
  assert run.main([*args, f"--workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err and "('" not in err, err
  assert len(err.strip().splitlines()) == 1


def test_the_progress_bar_tells_every_regime_apart():
  # Before: regimes were named by their first word: softmax_y_over_size and
  # softmax_plus_complement both showed as "softmax", the mcl_* and ure_* alike.
  from jaxsoftmax_experiments.execute import short_names

  names = [
    "softmax_y_over_size",
    "softmax_plus_complement",
    "sigmoid",
    "clipped_softmax",
    "mcl_log",
    "mcl_exp",
    "ure_ga",
    "ure_nn",
    "positive_only",
  ]
  short = short_names(names)
  assert len(set(short.values())) == len(names)
  assert short["softmax_y_over_size"] == "softmax_y" and short["positive_only"] == "positive"
  assert short["mcl_log"] == "mcl_log" and short["sigmoid"] == "sigmoid"


@pytest.mark.parametrize(
  "tree_args",
  [[], ["--config.tree=balanced", "--config.branching=3"]],
  ids=["huffman", "balanced_3"],
)
def test_a_tree_whose_node_count_equals_its_depth_trains(tmp_path, tree_args):
  # The runs: three classes, the tree head and two negatives per input ended in
  # "ValueError: members has shape (128, 2); with node_logits (128, 2, 2, 2) it must be
  # (128, 2, 'M')": the head's path logits were read as the node table.
  flag = _npz(tmp_path / "three.npz")
  workdir = tmp_path / "three"
  args = [a for a in TINY if not a.startswith("--config.dataset")]
  command = [
    "--config=feedback_digits",
    f"--workdir={workdir}",
    flag,
    *args,
    "--config.num_labeled=20",
    "--config.head=tree",
    "--config.protocol=uniform",
    "--config.num_negatives=2",
    *tree_args,
  ]
  assert run.main(command) == 0
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["regimes"]) >= {"complement_likelihood"}


@pytest.mark.parametrize(
  "args",
  [
    ["--help"],
    ["--config=lm_repetition", "--help"],
    ["--config=feedback_digits", "--config.step=3", "--workdir=unused"],
    ["--config=feedback_digits:sigmoid", "--workdir=unused"],
  ],
)
def test_help_and_up_front_refusals_answer_before_jax_loads(args):
  # Before: every call, --help and a typo included, imported JAX first (6-17 s for --help
  # on a loaded machine).
  code = (
    "import sys\n"
    "from jaxsoftmax_experiments import run\n"
    f"status = run.main({args!r})\n"
    "print(status, 'jax' in sys.modules)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  status, loaded = out.stdout.split()[-2:]
  assert loaded == "False", out.stdout[-500:]
  assert int(status) == (0 if "--help" in args else 2)
