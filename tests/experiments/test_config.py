"""Experiment configs: the packaged config files pass, and every bad value names its key."""

import importlib.util
from pathlib import Path

import ml_collections
import pytest

from jaxsoftmax_experiments import config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load_config(name, *args):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


@pytest.mark.parametrize(
  "name, args",
  [
    ("feedback_digits", ()),
    ("mnist1d_supervised", ("mlp",)),
    ("mnist1d_supervised", ("cnn",)),
  ],
)
def test_config_files_are_valid_and_locked(name, args):
  c = load_config(name, *args)
  config.validate(c)
  assert set(c.keys()) == set(config.KEYS)
  with pytest.raises(AttributeError):
    c.no_such_key = 1  # locked: a typo cannot add a key


def test_defaults_hold_every_key_the_issue_requires():
  # The keys that scripts may rely on, listed in the experiment issue.
  required = {
    "dataset",
    "protocol",
    "model",
    "regimes",
    "num_seeds",
    "steps",
    "batch_size",
    "learning_rate",
    "num_labeled",
    "seed",
    "eval_every",
  }
  assert required <= set(config.defaults().keys())


@pytest.mark.parametrize(
  "key, value",
  [
    ("dataset", "cifar10"),
    ("protocol", "random"),
    ("model", "resnet"),
    ("hidden", (100, 0)),
    ("channels", ()),
    ("kernel_size", -1),
    ("regimes", ()),
    ("regimes", ("positive_only", "positive_only")),
    ("regimes", ("unlikelihood",)),
    ("num_seeds", 0),
    ("steps", 0),
    ("batch_size", -3),
    ("optimizer", "lion"),
    ("learning_rate", 0.0),
    ("learning_rate", float("nan")),
    ("weight_decay", -0.1),
    ("schedule", "step"),
    ("warmup_steps", -1),
    ("num_labeled", 0),
    ("initial_steps", 0),
    ("feedback_rounds", 0),
    ("bias", 1.5),
    ("logit_bound", float("inf")),
    ("seed", -1),
    ("eval_every", 0),
    ("head", "adaptive"),
    ("num_clusters", -1),
  ],
)
def test_bad_value_names_its_key(key, value):
  c = config.defaults()
  c[key] = value
  with pytest.raises(config.ConfigError, match=rf"^config\.{key}: must be"):
    config.validate(c)


def test_wrong_type_names_its_key():
  c = config.defaults().to_dict()
  c["steps"] = 10.5
  with pytest.raises(config.ConfigError, match=r"^config\.steps: must be an int"):
    config.validate(ml_collections.ConfigDict(c))


def test_unknown_and_missing_keys():
  c = config.defaults()
  c.stepz = 3
  with pytest.raises(config.ConfigError, match=r"^config\.stepz: unknown key"):
    config.validate(c)
  c = config.defaults()
  del c["eval_every"]
  with pytest.raises(config.ConfigError, match=r"^config\.eval_every: missing"):
    config.validate(c)


def test_cross_key_checks():
  c = config.defaults()
  c.protocol, c.feedback_rounds = "uniform", 2
  with pytest.raises(config.ConfigError, match=r"^config\.feedback_rounds"):
    config.validate(c)
  c = config.defaults()
  c.warmup_steps = c.steps + 1
  with pytest.raises(config.ConfigError, match=r"^config\.warmup_steps"):
    config.validate(c)
  c = config.defaults()
  c.num_labeled = 1348  # digits has 1347 training examples (test_data)
  config.validate(c)
  with pytest.raises(config.ConfigError, match=r"^config\.num_labeled: must be at most the 1347"):
    config.validate(c, num_train=1347)


def test_the_tree_keys_need_the_tree_head_and_a_branching_of_two_or_more():
  c = config.defaults()
  c.tree = "balanced"
  with pytest.raises(
    config.ConfigError, match=r"^config\.tree, config\.branching: only the tree head"
  ):
    config.validate(c)
  c.head = "tree"
  config.validate(c, num_classes=10)
  c.branching = 1
  with pytest.raises(config.ConfigError, match=r"^config\.branching: .*an int >= 2"):
    config.validate(c)
  c.branching, c.tree = 2, "random"
  with pytest.raises(config.ConfigError, match=r"^config\.tree: .*one of huffman, balanced"):
    config.validate(c)


def test_the_tree_keys_are_recorded_only_with_the_tree_head():
  # A run of another head records the config it recorded before these keys existed, so
  # its folder still resumes (same config check, same checkpoint fingerprint).
  for kind in ("classifier", "lm"):
    values = config.defaults(kind).to_dict()
    # The language model's repetition and unlearning do not record the feedback keys either.
    other = set(config.FEEDBACK_KEYS) if kind == "lm" else set()
    assert not {"tree", "branching"} & set(config.recorded(values)), kind
    assert set(config.recorded(values)) == set(values) - {"tree", "branching"} - other
    values["head"] = "tree"
    assert config.recorded(values) == {k: v for k, v in values.items() if k not in other}


def test_the_feedback_keys_are_recorded_only_by_the_feedback_experiment():
  # As the tree keys: the language model's earlier experiments record what they recorded
  # before these keys existed (their folders resume, their results stay byte for byte).
  values = config.defaults("lm").to_dict()
  for experiment in ("repetition", "unlearning"):
    values["experiment"] = experiment
    assert not set(config.FEEDBACK_KEYS) & set(config.recorded(values)), experiment
  values["experiment"] = "feedback"
  assert set(config.FEEDBACK_KEYS) <= set(config.recorded(values))
  # The classifier's keys of the same names (num_labeled, feedback_rounds) stay recorded.
  classifier = config.defaults("classifier").to_dict()
  assert {"num_labeled", "feedback_rounds"} <= set(config.recorded(classifier))


def test_num_clusters_needs_the_hierarchical_head_and_at_most_k_clusters():
  c = config.defaults()
  c.num_clusters = 3
  with pytest.raises(
    config.ConfigError, match=r"^config\.num_clusters: only the hierarchical head"
  ):
    config.validate(c)
  c.head = "hierarchical"
  config.validate(c, num_classes=10)
  c.num_clusters = 11
  with pytest.raises(
    config.ConfigError, match=r"^config\.num_clusters: must be at most the 10 classes"
  ):
    config.validate(c, num_classes=10)


def test_sets_across_feedback_rounds_refuse_one_label_regimes_and_the_hierarchical_head():
  c = config.defaults()
  c.feedback_rounds, c.regimes = 2, ("complement_likelihood", "mcl_exp", "pc")
  with pytest.raises(config.ConfigError, match=r"^config\.feedback_sets: 'pc' takes one wrong"):
    config.validate(c)
  c.feedback_sets = False  # one negative example per round: pc can take each
  config.validate(c)
  c.feedback_sets, c.regimes, c.head = True, ("complement_likelihood",), "hierarchical"
  with pytest.raises(config.ConfigError, match=r"^config\.feedback_sets: the hierarchical head"):
    config.validate(c)
  c.feedback_rounds = 1  # one round gathers no set
  config.validate(c)
