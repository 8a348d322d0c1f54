"""The language model's feedback experiment (``lm_feedback``): its task, judge, pass@k,
sampler, the regimes on whole answers, the user's task file, and a run killed in round 2."""

import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kinds_common import TINY_FEEDBACK

from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import judged, regimes, run

# A tiny run (kinds_common's): a start of 40 steps, 2 rounds of 10 steps, evaluations
# and checkpoints every 5.
TINY = [
  *TINY_FEEDBACK,
  "--config.eval_every=5",
  "--config.checkpoint_every=5",
  "--progress=false",
  "--compilation_cache=",
]


# --- pass@k ---------------------------------------------------------------------------------


def test_pass_at_k_equals_exhaustive_enumeration_of_the_k_subsets():
  # The estimator's definition: the share of k-subsets of the n samples holding a right one.
  n = 7
  for c in range(n + 1):
    right = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(right, k))
      want = sum(any(s) for s in subsets) / len(subsets)
      got = judged.pass_at_k(n, np.array([c]), k)[0]
      assert got == pytest.approx(want, abs=1e-12), (c, k)


def test_pass_at_k_at_1_is_the_share_right_and_the_ks_are_powers_of_two():
  c = np.array([0, 3, 8])
  np.testing.assert_allclose(judged.pass_at_k(8, c, 1), c / 8)
  assert judged.ks(8) == (1, 2, 4, 8) and judged.ks(6) == (1, 2, 4) and judged.ks(1) == (1,)


# --- the task and the judge -------------------------------------------------------------------


def test_addition_draws_reversed_sums_and_the_splits_share_no_prompt():
  task = judged.addition(2)
  prompt, answer = task.draw(3)
  a, b = int(prompt[:2]), int(prompt[3:5])
  assert prompt[2] == "+" and prompt[5] == "=" and answer[::-1] == f"{a + b:03d}"
  problems = judged.draw_problems(task, dict(labeled=50, unlabeled=40, validation=20, test=20), 0)
  seen = [{tuple(p) for p in getattr(problems, split)[0]} for split in judged.SPLITS]
  assert [len(s) for s in seen] == [50, 40, 20, 20]  # distinct within each split
  assert not any(a & b for a, b in itertools.combinations(seen, 2))  # and across them


def test_the_judge_is_exact_match_or_the_tasks_own():
  task = judged.addition(1)
  prompts = np.zeros((2, 4), np.int32)
  references = np.array([[1, 2], [3, 4]])
  answers = np.array([[[1, 2], [2, 1]], [[3, 4], [3, 4]]])  # [n, m, A]
  np.testing.assert_array_equal(
    judged.judge(task, prompts, answers, references), [[True, False], [True, True]]
  )
  lenient = judged.Task("first digit", task.vocabulary, task.draw, lambda p, a, r: a[0] == r[0])
  np.testing.assert_array_equal(
    judged.judge(lenient, prompts, answers[None], references)[0], [[True, False], [True, True]]
  )
  answers = np.array([[[1, 9], [2, 2]], [[3, 0], [0, 4]]])
  np.testing.assert_array_equal(
    judged.judge(lenient, prompts, answers, references), [[True, False], [True, False]]
  )


# --- a user's task file -----------------------------------------------------------------------


def test_the_language_model_guide_shows_the_example_task_file_the_tests_run():
  guide = (
    Path(__file__).resolve().parents[2] / "docs" / "guides" / "language_models.md"
  ).read_text()
  assert "```python\n" + judged.EXAMPLE_TASK + "```" in guide


def test_the_documented_example_task_file_runs(tmp_path):
  path = tmp_path / "subtraction.py"
  path.write_text(judged.EXAMPLE_TASK)
  assert len(judged.EXAMPLE_TASK.splitlines()) <= 20
  task = judged.load_task(str(path))
  assert task.vocabulary == tuple("0123456789-=neg") and task.judge is not None
  problems = judged.draw_problems(task, dict(labeled=5, unlabeled=5, validation=5, test=5), 0)
  assert problems.test[0].shape == (5, 6) and problems.test[1].shape == (5, 3)


BROKEN = {
  "no vocabulary": ("def draw(seed):\n  return '1+1=', '2'\n", "defines no VOCABULARY"),
  "no draw": ("VOCABULARY = '0123'\n", "defines no draw(seed)"),
  "repeated": ("VOCABULARY = '00'\ndef draw(seed):\n  return '0', '0'\n", "repeats a character"),
  "raises": ("raise RuntimeError('oops')\n", "loading it raised RuntimeError: oops"),
  "not a pair": ("VOCABULARY = '01'\ndef draw(seed):\n  return '01'\n", "two strings"),
  "outside": ("VOCABULARY = '01'\ndef draw(seed):\n  return '01', '2'\n", "outside VOCABULARY"),
  "lengths": (
    "VOCABULARY = '01'\ndef draw(seed):\n  return '0' * (1 + seed % 2), '1'\n",
    "every prompt needs the same length",
  ),
  "judge": (
    "VOCABULARY = '01'\ndef draw(seed):\n  return format(seed % 64, '06b'), '1'\n"
    "def judge(p, a, r):\n  return False\n",
    "the reference answer must be judged right",
  ),
  "few": ("VOCABULARY = '01'\ndef draw(seed):\n  return '0', '1'\n", "distinct prompts"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_task_file_is_refused_naming_what_is_wrong(tmp_path, capsys, case):
  source, message = BROKEN[case]
  path = tmp_path / "task.py"
  path.write_text(source)
  args = [a for a in TINY if "num_" not in a] + [
    f"--config.task=py:{path}",
    "--config.num_labeled=3",
    "--config.num_unlabeled=3",
    "--config.num_validation=2",
    "--config.num_test=2",
    f"--workdir={tmp_path / 'w'}",
  ]
  assert run.main(args) == 2
  err = capsys.readouterr().err
  assert "config.task" in err or "config.num_labeled" in err, err
  assert message in err and "Traceback" not in err, err
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_a_missing_task_file_is_named(tmp_path, capsys):
  args = [*TINY, f"--config.task=py:{tmp_path / 'nowhere.py'}", f"--workdir={tmp_path / 'w'}"]
  assert run.main(args) == 2
  assert "nowhere.py: no such file" in capsys.readouterr().err


# --- the sampler ------------------------------------------------------------------------------


def _plan(**overrides):
  c = config_lib.defaults("lm")
  c.experiment, c.regimes, c.head = "feedback", ("labeled_only", "nft"), "softmax"
  for k, v in dict(width=16, depth=1, heads=2, num_seeds=1, batch_size=4, **overrides).items():
    c[k] = v
  from jaxsoftmax_experiments.kinds import lm

  loaded = lm.load(c)
  return lm.plan(c, loaded, None)


def test_greedy_answers_are_the_step_by_step_argmax_and_logp_scores_them():
  plan = _plan(num_labeled=5, num_unlabeled=5, num_validation=5, num_test=5)
  params = judged._init(plan, jax.random.key(0)).params
  model = judged._model(plan, params)
  prompts = jnp.asarray(plan.problems.test[0])
  greedy = judged.sample(plan, params, prompts, jax.random.key(1), 1, None)[:, 0]
  seq = prompts
  for _ in range(plan.answer_length):  # the naive loop: the whole prefix, one token more
    nxt = jnp.argmax(model(seq)[:, -1], -1).astype(jnp.int32)
    seq = jnp.concatenate([seq, nxt[:, None]], -1)
  np.testing.assert_array_equal(greedy, seq[:, prompts.shape[1] :])
  logp = judged.token_logp(plan, params, prompts, greedy[:, None])[:, 0]
  z = model(seq[:, :-1]).astype(jnp.float64 if jax.config.x64_enabled else jnp.float32)
  p = prompts.shape[1]
  want = jax.nn.log_softmax(z[:, p - 1 :], -1)
  want = jnp.take_along_axis(want, greedy[..., None], -1)[..., 0]
  np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-6)


def test_samples_at_a_temperature_follow_the_models_distribution():
  plan = _plan(num_labeled=5, num_unlabeled=5, num_validation=5, num_test=5)
  params = judged._init(plan, jax.random.key(0)).params
  prompts = jnp.asarray(plan.problems.test[0][:1])
  draws = judged.sample(plan, params, prompts, jax.random.key(2), 4000, 1.0)[0, :, 0]
  z = judged._model(plan, params)(prompts)[0, -1]
  want = np.asarray(jax.nn.softmax(z))
  got = np.bincount(np.asarray(draws), minlength=len(want)) / len(draws)
  assert np.abs(got - want).max() < 0.03  # 4000 draws: 3 standard errors at p = 0.5 is 0.024


# --- the regimes on whole answers ------------------------------------------------------------


def _answer_batch(seed=0, b=3, t=5, v=6, answer=2):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(size=(b, t, v)) * 3, jnp.float32)
  tokens = rng.integers(0, v, size=(b, t))
  labels = jnp.asarray(np.where(np.arange(t) >= t - answer, tokens, -1), jnp.int32)
  return z, labels


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  return (
    z
    - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - z.max(-1, keepdims=True)
  )


def _token_logp64(z, labels):
  ls = _log_softmax64(z)
  lab = np.asarray(labels)
  return np.where(lab >= 0, np.take_along_axis(ls, np.maximum(lab, 0)[..., None], -1)[..., 0], 0.0)


class _S:  # the settings the regimes read
  wreinforce_lambda, pmpo_alpha, pmpo_beta, nft_epsilon = 0.1, 0.5, 0.1, 0.1
  simnpo_beta, simnpo_gamma, npo_beta = 2.5, 0.3, 0.1


HEAD = judged.SequenceHead(
  __import__("jaxsoftmax_experiments.heads", fromlist=["x"]).SoftmaxHead(6)
)


def test_the_shared_regimes_on_answers_are_the_naive_formulas_in_float64():
  z, labels = _answer_batch()
  logp = _token_logp64(z, labels).sum(-1)  # log P(answer)
  batch = judged.Answers(labels)
  cases = {
    "negated_gradient": logp,  # +log P(wrong answer)
    "complement_likelihood": -np.log1p(-np.exp(logp)),
    "nsr": logp,
    "w_reinforce": logp,
    "pmpo": (0.1 - 0.5) * -logp,
    "simnpo": (2 / 2.5) * np.log1p(np.exp(2.5 * logp / 2 + 0.3)),
  }
  for name, want in cases.items():
    got = regimes.REGIMES[name].negative(HEAD, z, batch, _S)
    np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=name)
  for name, want in {
    "positive_only": -logp,
    "w_reinforce": -0.1 * logp,
    "pmpo": 0.6 * -logp,
  }.items():
    got = regimes.REGIMES[name].positive(HEAD, z, batch, _S)
    np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=name)


def test_token_unlikelihood_and_nft_are_their_papers_formulas_in_float64():
  z, labels = _answer_batch(seed=1)
  tok = _token_logp64(z, labels)
  keep = np.asarray(labels) >= 0
  got = regimes.REGIMES["token_unlikelihood"].negative(HEAD, z, judged.Answers(labels), _S)
  want = np.where(keep, -np.log1p(-np.exp(np.where(keep, tok, -1.0))), 0).sum(-1)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  old = tok + np.random.default_rng(2).normal(size=tok.shape) * 0.5  # the sampler's
  old = np.where(keep, old, 0.0)
  rate = np.array([0.0, 0.25, 0.75])
  batch = judged.Answers(labels, None, None, jnp.asarray(old, jnp.float32), jnp.asarray(rate))
  got = regimes.REGIMES["nft"].negative(HEAD, z, batch, _S)
  ratio = np.exp(tok - old)
  implicit = (1 - rate[:, None] * ratio) / (1 - rate[:, None])
  want = np.where(keep, -np.log(np.maximum(implicit, 0.1)), 0).sum(-1)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert float(got[0]) == 0.0  # no answer of the prompt right: NFT's term is 0


def test_the_set_regime_counts_a_prompts_distinct_wrong_answers_once():
  z, labels = _answer_batch(seed=3, b=4)
  sets = jnp.stack([labels[:2], labels[2:]])  # [2 prompts, 2 answers, T]
  sets = sets.at[1, 1].set(sets[1, 0])  # the second prompt's answers: one, repeated
  out = jnp.stack([z[:2], jnp.stack([z[2], z[2]])])
  got = regimes.REGIMES["complement_set_likelihood"].negative(HEAD, out, judged.Answers(sets), _S)
  p = np.exp(_token_logp64(z, labels).sum(-1))
  np.testing.assert_allclose(got, [-np.log1p(-(p[0] + p[1])), -np.log1p(-p[2])], rtol=2e-5)


def test_a_judged_regime_is_refused_where_there_are_no_judged_answers(capsys, tmp_path):
  c = config_lib.defaults("lm")
  c.regimes = ("nft",)
  with pytest.raises(config_lib.ConfigError, match="'nft' trains on judged answers"):
    config_lib.validate(c)
  args = ["--config=feedback_digits", "--config.regimes=('nsr',)", f"--workdir={tmp_path}"]
  assert run.main(args) == 2
  assert "config.regimes" in capsys.readouterr().err
  args = [*TINY, "--config.head=tree", f"--workdir={tmp_path / 'tree'}"]
  assert run.main(args) == 2
  err = capsys.readouterr().err
  assert "config.head: the feedback experiment's sequence losses take the softmax or the " in err


def test_a_shared_regime_is_one_entry_of_the_one_table():
  for name in ("positive_only", "negated_gradient", "complement_likelihood", "npo"):
    assert name in regimes.NAMES and name in config_lib.LM_EXPERIMENTS["feedback"]
  assert set(regimes.JUDGED_NAMES) <= set(regimes.REGIMES)
  assert not set(regimes.JUDGED_NAMES) & set(regimes.NAMES)
  assert regimes.REGIMES["nsr"].negative is regimes.REGIMES["negated_gradient"].negative


# --- runs ---------------------------------------------------------------------------------------


def _files(workdir):
  return {
    name: (workdir / name).read_bytes()
    for name in ("results.json", "metrics.jsonl", "summary.md", "config.json")
  }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("feedback")
  assert run.main([*TINY, f"--workdir={workdir}"]) == 0
  return workdir, _files(workdir)


# Two regimes, for the runs that are stopped and resumed: one answer at a time and a
# prompt's set of answers.
TWO = [*TINY, "--config.regimes=('labeled_only', 'complement_set_likelihood')"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two")
  assert run.main([*TWO, f"--workdir={workdir}"]) == 0
  return workdir, _files(workdir)


def test_a_run_records_every_metric_at_every_evaluation(finished):
  workdir, files = finished
  lines = [json.loads(l) for l in files["metrics.jsonl"].decode().splitlines()]
  regimes_ = config_lib.LM_EXPERIMENTS["feedback"]
  assert {(l["step"], l["regime"], l["seed"]) for l in lines} == {
    (t, r, s) for t in (0, 5, 10, 15, 20) for r in regimes_ for s in (0, 1)
  }
  for l in lines:
    assert l["round"] == (0 if l["step"] <= 10 else 1)
    assert 0 <= l["exact_match"] <= 1 and 1 <= l["distinct_answers"] <= 4
    assert l["pass@1"] <= l["pass@2"] <= l["pass@4"]
    assert 0 <= l["answer_entropy"] <= math.log(4) + 1e-9
    assert l["judged_right"] + l["judged_wrong"] == 24 * 3
  # At the start every regime is the same model, sampled with the same key.
  start = [l for l in lines if l["step"] == 0 and l["seed"] == 0]
  assert len({(l["exact_match"], l["pass@4"], l["answer_nll"]) for l in start}) == 1
  # Round 1's answers are the start's for every regime; round 2's each regime's own.
  first = {l["judged_right"] for l in lines if l["step"] == 10 and l["seed"] == 0}
  assert len(first) == 1
  results = json.loads(files["results.json"])
  assert set(results["regimes"]) == set(regimes_)
  assert len(results["regimes"]["nft"]["exact_match_by_round"]) == 2
  summary = files["summary.md"].decode()
  assert "| nsr (NSR) |" in summary and "round 2" in summary and "pass@4" in summary
  assert (workdir / "curves.png").stat().st_size > 0


def test_a_run_stopped_in_round_2_resumes_to_the_same_files_byte_for_byte(
  two, tmp_path, monkeypatch
):
  from jaxsoftmax_experiments import execute

  _, files = two
  workdir = tmp_path / "stopped"
  real = execute.Options
  # The 4th evaluation is step 15, in round 2 (steps 11-20): the run stops with the
  # checkpoint of step 15, as a kill after that checkpoint leaves it.
  monkeypatch.setattr(execute, "Options", lambda **k: real(**k, stop_after=4))
  assert run.main([*TWO, f"--workdir={workdir}"]) == run.INTERRUPTED
  assert not (workdir / "results.json").exists()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [5, 10, 15]
  monkeypatch.undo()
  assert run.main([*TWO, f"--workdir={workdir}"]) == 0
  assert json.loads((workdir / "timing.json").read_text())["resumed_from_step"] == 15
  assert _files(workdir) == files


def test_a_run_killed_in_round_2_resumes_to_the_same_files(two, tmp_path):
  # SIGKILL of the command itself, once the checkpoint of step 15 (round 2) is written.
  import os
  import signal
  import subprocess
  import sys
  import time

  _, files = two
  workdir = tmp_path / "killed"
  # The evaluations are slowed down in the child (0.5 s each), so that it is still running
  # when the checkpoint of step 15 appears.
  slow = (
    "import time, sys; from jaxsoftmax_experiments import judged, run; real = judged.records; "
    "judged.records = lambda *a: (time.sleep(0.5), real(*a))[1]; "
    "sys.exit(run.main(sys.argv[1:]))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    [sys.executable, "-c", slow, *TWO, f"--workdir={workdir}"],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    env=env,
  )
  deadline = time.monotonic() + 240
  while not (workdir / "checkpoints" / "15").is_dir():
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.monotonic() < deadline, "no checkpoint 15 within 240 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()
  assert run.main([*TWO, f"--workdir={workdir}"]) == 0
  assert json.loads((workdir / "timing.json").read_text())["resumed_from_step"] >= 15
  assert _files(workdir) == files


def test_the_fused_head_runs_the_experiment_as_the_softmax_head(finished, tmp_path):
  # The head's every method through the fused losses (fused_sequence_* on the positives
  # and sets, the fused token losses): the start is the same model up to rounding, so its
  # metrics agree.
  _, files = finished
  workdir = tmp_path / "fused"
  names = "('complement_set_likelihood', 'token_unlikelihood', 'nft')"
  args = [*TINY, "--config.head=fused", "--config.vocab_chunk=5", f"--config.regimes={names}"]
  assert run.main([*args, f"--workdir={workdir}"]) == 0
  key = lambda r: (r["step"], r["regime"], r["seed"])
  softmax = {key(r): r for r in map(json.loads, files["metrics.jsonl"].decode().splitlines())}
  fused = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(fused) == 5 * 3 * 2
  for r in fused:
    if r["step"] == 0:
      assert r["answer_nll"] == pytest.approx(softmax[key(r)]["answer_nll"], rel=1e-3)
      assert r["exact_match"] == softmax[key(r)]["exact_match"]
    assert r["answer_nll"] is not None and math.isfinite(r["answer_nll"])


def test_a_users_task_runs_through_the_command(tmp_path):
  path = tmp_path / "subtraction.py"
  path.write_text(judged.EXAMPLE_TASK)
  args = [*TINY, f"--config.task=py:{path}", "--config.regimes=('labeled_only', 'nft')"]
  assert run.main([*args, f"--workdir={tmp_path / 'w'}"]) == 0
  summary = (tmp_path / "w" / "summary.md").read_text()
  assert f"# feedback on the task in {path}" in summary
  results = json.loads((tmp_path / "w" / "results.json").read_text())
  assert results["data"]["vocab_size"] == 15 and results["config"]["task"] == f"py:{path}"
  assert Path(results["config"]["task"][3:]).exists()
