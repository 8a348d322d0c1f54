"""The language-model experiments: text, tokenizer, causal mask, unlikelihood candidates,
metrics on hand-made sequences, a short run per regime, and resume byte for byte."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kinds_common import small_text

from jaxsoftmax.models import TransformerLM
from jaxsoftmax_experiments import config as config_lib
from jaxsoftmax_experiments import execute, heads, run, text
from jaxsoftmax_experiments.kinds import lm as language

TINY = dict(
  num_seeds=2,
  steps=20,
  eval_every=10,
  batch_size=4,
  length=8,
  width=16,
  depth=1,
  heads=2,
  vocab_chunk=256,
  prompt=4,
  generate=8,
  num_prompts=4,
  initial_steps=20,
  learning_rate=1e-2,
  checkpoint_every=10,
)
# A run whose checks do not depend on help_topics' own topics: 20 of them as a text file.
SMALL_TEXT = dict(dataset=f"text:{small_text()}", forget=2)
FLAGS = [f"--config.{k}={v}" for k, v in TINY.items()] + [
  "--progress=false",
  "--compilation_cache=",
]


def lm_config(experiment="repetition", **overrides):
  c = config_lib.defaults("lm")
  c.experiment, c.regimes = experiment, config_lib.LM_EXPERIMENTS[experiment]
  for key, value in {**TINY, **overrides}.items():
    c[key] = value
  config_lib.validate(c)
  return c


def lm_execute(c, workdir, **options):
  return execute.execute(c, workdir, execute.Options(progress=False, **options))


def test_topics_split_and_vocabulary_are_fixed():
  parts = text.split(text.topics())
  assert [len(parts[p]) for p in ("train", "validation", "test")] == [64, 7, 8]
  assert not set(parts["train"]) & (set(parts["validation"]) | set(parts["test"]))
  corpus = text.corpus()
  assert len(corpus.vocabulary) == 1789 and corpus.vocabulary.words[0] == "<unk>"
  ids = corpus.vocabulary.encode("The value of x is returned.")
  assert corpus.vocabulary.decode(ids) == "the value of x is returned ."
  assert corpus.vocabulary.encode("zyzzyva")[0] == 0  # unseen: <unk>


def test_no_token_sees_the_future():
  lm = TransformerLM(50, 12, width=16, depth=2, heads=2, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 12)), jnp.int32)
  for t in (0, 5, 11):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 50)
    diff = jnp.abs(lm(changed) - lm(tokens)).max(axis=(0, 2))
    assert float(diff[:t].max(initial=0.0)) == 0.0 and float(diff[t]) > 0


def test_unlikelihood_candidates_are_the_previous_context_tokens_without_the_target():
  context = jnp.array([5, 6, 5, 7])
  targets = jnp.array([6, 5, 7, 8])  # targets[t] = context[t + 1]
  got = np.asarray(text.previous_tokens(context, targets))
  # Row t: context[0..t] without targets[t]; -1 elsewhere (by hand).
  want = [[5, -1, -1, -1], [-1, 6, -1, -1], [5, 6, 5, -1], [5, 6, 5, 7]]
  np.testing.assert_array_equal(got, want)


def test_repetition_metrics_on_hand_made_sequences():
  # 4-grams of 1 2 3 4 1 2 3 4: 1234 2341 3412 4123 1234 -> 4 unique of 5.
  assert language.seq_rep(np.array([1, 2, 3, 4, 1, 2, 3, 4])) == pytest.approx(0.2)
  assert language.seq_rep(np.array([1, 2, 3, 4, 5])) == 0.0
  # From position 2: token 1 is among [1, 2] (yes), 3 among [1, 2, 1] (no).
  assert language.repetition_rate(np.array([1, 2, 1, 3]), 2) == 0.5
  assert language.repetition_rate(np.array([9, 1, 2, 3, 4, 9]), 5, window=3) == 0.0


def test_fused_and_unfused_objectives_agree():
  s = language.Settings.of(lm_config())
  data, _ = language.make_data(s)
  model = language.build(s, data.vocab_size, jax.random.key(0))
  graphdef, params = nnx.split(model)
  batch = (jnp.asarray(data.train[:4]),)
  for regime in ("positive_only", "complement_likelihood", "negated_gradient"):
    value = lambda s: jax.jit(
      lambda p: language.objective(
        s, language.make_head(s, data.vocab_size), regime, nnx.merge(graphdef, p), batch
      )
    )(params)
    fused, softmax = value(s), value(dataclasses.replace(s, head="softmax"))
    np.testing.assert_allclose(fused[0], softmax[0], rtol=2e-5)
    # The fused head's largest |logit| is an upper bound of the logits' (Cauchy-Schwarz).
    assert float(softmax[1]) <= float(fused[1]) * (1 + 1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for experiment in ("repetition", "unlearning"):
    workdir = tmp_path_factory.mktemp(experiment)
    s = lm_config(experiment, **SMALL_TEXT)
    assert lm_execute(s, workdir) == 0
    out[experiment] = (s, workdir, json.loads((workdir / "results.json").read_text()))
  return out


def test_a_short_run_of_every_repetition_regime(runs):
  s, workdir, results = runs["repetition"]
  assert list(results["regimes"]) == ["positive_only", "complement_likelihood", "negated_gradient"]
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 3 * 3 * 2  # evaluations at 0, 10, 20 x regimes x seeds
  for name in ("positive_only", "complement_likelihood"):
    r = results["regimes"][name]
    start = [l["validation_perplexity"] for l in lines if l["step"] == 0 and l["regime"] == name]
    assert all(p < p0 for p, p0 in zip(r["validation_perplexity"], start)), (r, start)
    assert all(0 <= x <= 1 for x in r["seq_rep_4"])
    assert r["worse_than_uniform_at_step"] == [None, None]
  summary = (workdir / "summary.md").read_text()
  assert "| worse than uniform |" in summary
  # A user's text is named as such (before: "repetition on CPython's help topics").
  assert summary.splitlines()[0] == f"# repetition on the text {s.dataset[5:]}"


def test_a_short_run_of_every_unlearning_regime(runs):
  s, workdir, results = runs["unlearning"]
  assert list(results["regimes"]) == ["negated_gradient", "complement_likelihood", "npo"]
  assert len(results["data"]["forget_topics"]) == s.forget
  assert results["config"]["regimes"] == ["negated_gradient", "complement_likelihood", "npo"]
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  start = {l["seed"]: l["forget_nll"] for l in lines if l["step"] == 0}
  end = [l for l in lines if l["step"] == 20 and l["regime"] == "negated_gradient"]
  # Gradient ascent raises the forget NLL (or diverges doing so).
  assert all(l["diverged"] or l["forget_nll"] > start[l["seed"]] for l in end)
  # At the start the model is its reference (up to float32 rounding of two programs).
  assert all(abs(l["forget_log_ratio"]) < 1e-5 for l in lines if l["step"] == 0)


def test_a_stopped_run_resumes_to_the_same_files_byte_for_byte(runs, tmp_path):
  s, workdir, _ = runs["repetition"]
  assert lm_execute(s, tmp_path, stop_after=2) == 130
  assert not (tmp_path / "results.json").exists()
  assert lm_execute(s, tmp_path) == 0
  for name in ("results.json", "metrics.jsonl", "summary.md", "config.json"):
    assert (tmp_path / name).read_bytes() == (workdir / name).read_bytes(), name


def test_a_run_of_another_config_is_refused_naming_the_keys(runs, capsys):
  s, workdir, _ = runs["repetition"]
  before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
  other = s.copy_and_resolve_references()
  other.alpha = 2.0
  assert lm_execute(other, workdir) == 2
  assert "differing keys: alpha (1.0 -> 2.0)" in capsys.readouterr().err
  assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before


def test_bad_flags_are_refused(capsys, tmp_path):
  workdir = tmp_path / "x"
  assert run.main(["--config=lm_repetition", f"--workdir={workdir}", "--config.prompt=40"]) == 2
  assert "config.prompt: must be shorter than config.length" in capsys.readouterr().err
  # Before: --config.prompt=4 --config.generate=2 reported seq-rep-4 = 0.0 for every
  # regime, though a 2-token continuation has no 4-gram.
  args = ["--config=lm_repetition", f"--workdir={workdir}", "--config.generate=2"]
  assert run.main([*args, "--config.prompt=4"]) == 2
  assert "config.generate: seq-rep-4 counts the 4-grams" in capsys.readouterr().err
  assert (
    run.main(["--config=lm_repetition", f"--workdir={workdir}", "--config.experiment=poetry"]) == 2
  )
  assert "config.experiment: must be one of repetition, unlearning" in capsys.readouterr().err
  assert not workdir.exists()


def test_id_mask_marks_each_listed_id_once_and_ignores_padding():
  got = heads.id_mask(jnp.array([[[1, -1, 3, 1]], [[-1, -1, -1, -1]]]), 5)
  np.testing.assert_array_equal(got, [[[False, True, False, True, False]], [[False] * 5]])


def test_a_regime_of_both_kinds_is_one_entry_of_one_table():
  from jaxsoftmax_experiments import regimes

  # The LM's regimes are names of the classifier's table: one function per loss.
  for names in config_lib.LM_EXPERIMENTS.values():
    assert set(names) <= set(regimes.REGIMES)
  from jaxsoftmax_experiments.kinds import multilabel

  # The multi-label objectives are the same table's label-set entries.
  assert set(multilabel.OBJECTIVES) == set(regimes.LABEL_SET_NAMES) <= set(regimes.REGIMES)
  assert not set(regimes.LABEL_SET_NAMES) & set(regimes.NAMES)


def test_the_hierarchical_head_trains_unlearning_and_refuses_sets_by_name(tmp_path, capsys):
  workdir = tmp_path / "tree"
  c = lm_config(
    "unlearning",
    head="hierarchical",
    steps=10,
    eval_every=10,
    checkpoint_every=10,
    regimes=("complement_likelihood",),
    initial_steps=10,
    **SMALL_TEXT,
  )
  assert lm_execute(c, workdir) == 0
  results = json.loads((workdir / "results.json").read_text())
  start = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  for r in start:  # at step 0 every regime is the start, its own reference
    if r["step"] == 0:
      assert abs(r["forget_log_ratio"]) < 1e-5
  assert all(x is not None for x in results["regimes"]["complement_likelihood"]["forget_nll"])
  assert (
    run.main(
      [
        "--config=lm_repetition",
        f"--workdir={tmp_path / 'no'}",
        *FLAGS,
        "--config.head=hierarchical",
      ]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert "config.regimes: 'complement_likelihood' takes sets of wrong tokens" in err
  assert (
    run.main(
      [
        "--config=lm_repetition",
        f"--workdir={tmp_path / 'no'}",
        *FLAGS,
        "--config.regimes=('forward',)",
      ]
    )
    == 2
  )
  assert "'forward' needs a protocol's transition matrix" in capsys.readouterr().err


def test_continuations_shorter_than_the_context_are_generated():
  # Before: prompt 4 + generate 2 < length 8 ended in a JAX traceback at the first
  # evaluation (a window of 8 sliced from 6 tokens). Here prompt 4 + generate 4 < length 12
  # (a continuation shorter than 4 tokens is refused now: seq-rep-4 has no 4-gram in it).
  s = language.Settings.of(lm_config(prompt=4, generate=4, length=12))
  data, _ = language.make_data(s)
  plan = language.make_plan(s, data)
  params = jax.vmap(lambda k: nnx.state(language.build(s, data.vocab_size, k), nnx.Param))(
    jax.random.split(jax.random.key(0), 2)
  )
  prompts = jnp.asarray(data.validation[:3, :4])
  seqs = np.asarray(language._continue(plan, params, prompts))
  assert seqs.shape == (2, 3, 8)
  np.testing.assert_array_equal(seqs[:, :, :4], np.broadcast_to(prompts, (2, 3, 4)))
  # The padding is never read: the same continuations as with a longer budget's first four.
  longer = language.make_plan(dataclasses.replace(s, generate=12), data)
  np.testing.assert_array_equal(
    seqs, np.asarray(language._continue(longer, params, prompts))[:, :, :8]
  )


def test_the_tree_head_trains_unlearning_and_its_set_losses_equal_the_flat_ones(tmp_path):
  # Unlikelihood's sets of previous tokens ([B, T, M]) through a Huffman tree of the
  # training text's token counts: the losses equal the flat set losses of the
  # distribution the tree implies (tree_log_softmax of the node table).
  from jaxsoftmax import losses
  from jaxsoftmax.tree import Tree

  s = language.Settings.of(lm_config(head="tree"))
  data, _ = language.make_data(s)
  plan = language.make_plan(s, data)
  head = plan.head
  counts = language.token_counts(data)
  assert head.tree == Tree.huffman(counts)
  assert head.tree.depth[np.argmax(counts)] < head.tree.depth.mean()  # frequent: short paths
  model = language.build(s, data.vocab_size, jax.random.key(0), head)
  windows = jnp.asarray(data.train[:3])
  inputs, targets = windows[:, :-1], windows[:, 1:]
  wrong = language.candidates(windows)

  @jax.jit  # one program: op by op, a 15-level tree dispatches hundreds of small ones
  def both_ways(inputs, targets, wrong):
    out = head.training_output(model, inputs, targets)
    log_p = losses.tree_log_softmax(model(inputs), head.tree)
    mask = heads.id_mask(wrong, data.vocab_size)
    return (
      head.complement_nll(out, jnp.full_like(targets, -1), wrong),
      losses.complement_set_nll(log_p, mask),
      head.nll(out, targets),
      losses.nll(log_p, targets),
    )

  tree_complement, flat_complement, tree_nll, flat_nll = both_ways(inputs, targets, wrong)
  np.testing.assert_allclose(tree_complement, flat_complement, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(tree_nll, flat_nll, rtol=2e-5)
  # Unlearning through the framework with that tree (the set losses above run in the
  # classifier's tree-head test through the same loop).
  c = lm_config(
    "unlearning",
    head="tree",
    regimes=("complement_likelihood",),
    steps=10,
    eval_every=10,
    checkpoint_every=10,
    initial_steps=10,
    **SMALL_TEXT,
  )
  assert lm_execute(c, tmp_path / "unlearning") == 0
  record = json.loads((tmp_path / "unlearning" / "results.json").read_text())["regimes"][
    "complement_likelihood"
  ]
  assert all(x is not None and np.isfinite(x) for x in record["forget_nll"])


def test_a_users_text_is_loaded_once_per_contents_so_a_rerun_reuses_its_programs(tmp_path):
  # Before: each run on text:PATH loaded the file again into a new plan, so a rerun in the
  # same process (a resume, a notebook's second call) traced and compiled every program
  # again: 18.9 s against 4.5 s for the tests' language model on this machine.
  path = tmp_path / "topics.txt"
  path.write_text(small_text().read_text(encoding="utf-8"), encoding="utf-8")
  c = lm_config("unlearning", dataset=f"text:{path}", forget=2)
  first = language.load(c)
  assert language.load(c) is first
  assert language.plan(c, first, None) is language.plan(c, language.load(c), None)
  # The same path with other contents is another corpus.
  path.write_text(path.read_text(encoding="utf-8") + "\n\n" + "the value is x. " * 20, "utf-8")
  again = language.load(c)
  assert again is not first and again.info != first.info
