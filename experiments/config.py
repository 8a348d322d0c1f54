"""The experiment config: one key table for every kind, its defaults, and the checks.

A config's ``kind`` says which experiment it runs: ``lm`` (a language model: repetition
and unlearning) or ``multilabel`` (several true labels per example); a config without a
``kind`` key is a ``classifier`` (the feedback experiment and the supervised baselines),
so that classifier configs, their ``config.json`` and their checkpoints' fingerprints are
what they were before there were other kinds. Every kind shares the common keys
(``dataset``, ``regimes``, ``num_seeds``, ``steps``, ``batch_size``, ``learning_rate``,
``logit_bound``, ``seed``, ``eval_every``, ``checkpoint_every``) and adds its own; a key
of another kind is an unknown key, refused naming the kind it belongs to.

Config files under ``configs/`` start from :func:`defaults` and change what their
experiment needs; :func:`validate` then checks every key's type and range, so a typo
or a bad override fails before anything is computed or written.
"""

from __future__ import annotations

import math
import os

import ml_collections

from jaxsoftmax_experiments import data
from jaxsoftmax_experiments import heads as heads_lib
from jaxsoftmax_experiments import regimes as regimes_lib

KINDS = ("classifier", "lm", "multilabel")
REGIMES = ("positive_only", "negated_gradient", "complement_likelihood")  # the default comparison
PROTOCOLS = ("feedback", "uniform", "biased", "supervised")
MODELS = ("mlp", "cnn")
HEADS = heads_lib.NAMES
TREES = heads_lib.TREES
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
# The LM experiments' default regimes, from the one regime table: on token targets,
# positive_only is mle, complement_likelihood with the earlier tokens as the set is
# token-level unlikelihood (Welleck et al. 2019) and on forget tokens the complement,
# negated_gradient is the negated unlikelihood, or gradient ascent on forget tokens.
LM_EXPERIMENTS = {
  "repetition": ("positive_only", "complement_likelihood", "negated_gradient"),
  "unlearning": ("negated_gradient", "complement_likelihood", "npo"),
  "feedback": (
    "labeled_only",
    "positive_only",
    "negated_gradient",
    "complement_likelihood",
    "complement_set_likelihood",
    "token_unlikelihood",
    "npo",
    "nsr",
    "w_reinforce",
    "nft",
    "pmpo",
    "simnpo",
  ),
}
LITERATURE_NAMES = {
  "repetition": {
    "positive_only": "mle",
    "complement_likelihood": "unlikelihood",
    "negated_gradient": "negated unlikelihood",
  },
  "unlearning": {
    "positive_only": "retain only",
    "negated_gradient": "gradient ascent",
    "complement_likelihood": "complement",
    "npo": "NPO",
  },
  "feedback": {
    "positive_only": "RFT",
    "complement_likelihood": "-log(1 - P(a))",
    "complement_set_likelihood": "-log(1 - P(S))",
    "npo": "NPO",
    "nsr": "NSR",
    "w_reinforce": "W-REINFORCE",
    "nft": "NFT",
    "pmpo": "PMPO",
    "simnpo": "SimNPO",
  },
}
# The feedback experiment's arithmetic task, and where a user's task comes from.
LM_TASKS = ("addition",)
LM_HEADS = ("fused", "softmax", "hierarchical", "tree")
MULTILABEL_DATASETS = ("canvases", "generated")
MULTILABEL_OBJECTIVES = regimes_lib.LABEL_SET_NAMES


class ConfigError(ValueError):
  """A config key with a wrong type or a value out of range; the message names the key."""


# key -> (default, help): every key a classifier config may set, in --help's order.
_DEFAULTS = {
  "dataset": (
    "digits",
    "digits, mnist1d, synthetic, or npz:PATH (a file with x_train, y_train, "
    "x_test, y_test and optionally num_classes)",
  ),
  "protocol": ("feedback", "where the examples come from: " + ", ".join(PROTOCOLS)),
  "model": ("mlp", "mlp or cnn"),
  "hidden": ((100, 100), "MLP hidden layer sizes"),
  "channels": ((25, 25, 25), "CNN channels, one strided convolution each"),
  "kernel_size": (0, "CNN kernel size; 0: 5 for 1-D inputs, 3 for 2-D"),
  "head": (
    "softmax",
    "output layer: softmax, hierarchical (a two-level class tree), fused "
    "(the fused linear + loss of jaxsoftmax.losses: training forms no logits) "
    "or tree (a tree of any depth: config.tree, config.branching)",
  ),
  "num_clusters": (0, "hierarchical head: balanced clusters; 0: ceil(sqrt(classes))"),
  "tree": ("huffman", "tree head: huffman (from the training labels' class counts) or balanced"),
  "branching": (2, "tree head: children per internal node (2: a binary tree)"),
  "regimes": (REGIMES, "how negative examples are used, each of " + ", ".join(regimes_lib.NAMES)),
  "num_seeds": (5, "seeds trained in parallel (jax.vmap)"),
  "steps": (1000, "optimizer steps per regime (per feedback round)"),
  "batch_size": (128, "examples per step, drawn with replacement"),
  "optimizer": ("adam", "adam (AdamW when weight_decay > 0) or sgd (momentum 0.9)"),
  "learning_rate": (1e-3, "peak learning rate"),
  "weight_decay": (0.0, "decoupled weight decay"),
  "schedule": ("constant", "constant, or cosine decay to 0 after warmup_steps"),
  "warmup_steps": (0, "linear warmup from 0"),
  "num_labeled": (100, "true labels per seed, drawn from the training split"),
  "initial_steps": (500, "feedback: steps that train the model making the predictions"),
  "feedback_rounds": (1, "feedback: rounds of predict, judge, train"),
  "feedback_sets": (
    True,
    "feedback: an input's wrong predictions over the rounds form one "
    "set of wrong labels (False: one negative example per round)",
  ),
  "bias": (0.5, "biased: probability that the wrong label is (y + 1) mod K"),
  "num_negatives": (
    1,
    "uniform and biased: distinct wrong labels per unlabeled input, used as one set",
  ),
  "npo_beta": (0.1, "npo: the inverse temperature beta of its loss"),
  "logit_bound": (
    1e3,
    "a run whose largest |logit| passes this, or whose loss falls below minus this, has diverged",
  ),
  "seed": (0, "the root of every random draw"),
  "eval_every": (100, "steps between evaluations on the test split"),
  "checkpoint_every": (500, "steps between checkpoints (at evaluations); 0: only the last"),
}


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
  return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _positive_int(v):
  return _is_int(v) and v >= 1


def _int_tuple(v):
  return isinstance(v, (tuple, list)) and all(_positive_int(x) for x in v)


# key -> (test, what the value must be)
_RULES = {
  "dataset": (
    lambda v: v in data.NAMES or (isinstance(v, str) and v.startswith("npz:")),
    f"one of {', '.join(data.NAMES)}, or npz:PATH",
  ),
  "protocol": (lambda v: v in PROTOCOLS, f"one of {', '.join(PROTOCOLS)}"),
  "model": (lambda v: v in MODELS, f"one of {', '.join(MODELS)}"),
  "hidden": (_int_tuple, "a tuple of positive ints"),
  "channels": (lambda v: _int_tuple(v) and len(v) >= 1, "a non-empty tuple of positive ints"),
  "kernel_size": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
  "head": (lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
  "num_clusters": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
  "tree": (lambda v: v in TREES, f"one of {', '.join(TREES)}"),
  "branching": (lambda v: _is_int(v) and v >= 2, "an int >= 2"),
  "regimes": (
    lambda v: (
      isinstance(v, (tuple, list))
      and len(v) >= 1
      and len(set(v)) == len(v)
      and all(r in regimes_lib.NAMES for r in v)
    ),
    f"a non-empty tuple of distinct names from {', '.join(regimes_lib.NAMES)}",
  ),
  "num_seeds": (_positive_int, "an int >= 1"),
  "steps": (_positive_int, "an int >= 1"),
  "batch_size": (_positive_int, "an int >= 1"),
  "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
  "learning_rate": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
  "weight_decay": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
  "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
  "warmup_steps": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
  "num_labeled": (_positive_int, "an int >= 1"),
  "initial_steps": (_positive_int, "an int >= 1"),
  "feedback_rounds": (_positive_int, "an int >= 1"),
  "feedback_sets": (lambda v: isinstance(v, bool), "True or False"),
  "bias": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
  "num_negatives": (_positive_int, "an int >= 1"),
  "npo_beta": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
  "logit_bound": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
  "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
  "eval_every": (_positive_int, "an int >= 1"),
  "checkpoint_every": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
}
KEYS = tuple(_RULES)  # the classifier's keys
assert KEYS == tuple(_DEFAULTS), "every key needs a default, a help line and a rule"

_COMMON = (
  "dataset",
  "regimes",
  "num_seeds",
  "steps",
  "batch_size",
  "learning_rate",
  "logit_bound",
  "seed",
  "eval_every",
  "checkpoint_every",
)


def _like(key: str, default, help_: str | None = None) -> tuple:
  """A common key's entry for another kind: its own default (and help), the classifier's
  rule, so that a key means and is checked the same in every kind."""
  return (default, help_ or _DEFAULTS[key][1], *_RULES[key])


def _names(allowed):
  return lambda v: (
    isinstance(v, (tuple, list))
    and len(v) >= 1
    and len(set(v)) == len(v)
    and all(r in allowed for r in v)
  )


# key -> (default, help, test, what the value must be), for the language-model kind.
_LM = {
  "kind": ("lm", "the experiment: " + ", ".join(KINDS), lambda v: v == "lm", "'lm' here"),
  "dataset": (
    "help_topics",
    "help_topics (CPython's help topics), or text:PATH (a UTF-8 text "
    "file, or a folder of them, split and tokenised as help_topics is)",
    lambda v: v == "help_topics" or (isinstance(v, str) and v.startswith("text:") and len(v) > 5),
    "help_topics, or text:PATH",
  ),
  "experiment": (
    "repetition",
    "repetition (unlikelihood against repeats, from a random start), "
    "unlearning (forget topics from a trained start) or feedback (the model's own "
    "answers to a task, judged, trained on)",
    lambda v: v in LM_EXPERIMENTS,
    "one of " + ", ".join(LM_EXPERIMENTS),
  ),
  "regimes": (
    LM_EXPERIMENTS["repetition"],
    "from the one regime table (" + ", ".join(regimes_lib.NAMES) + "); those whose "
    "needs the experiment and head meet. Default repetition: "
    + ", ".join(LM_EXPERIMENTS["repetition"])
    + "; unlearning: "
    + ", ".join(LM_EXPERIMENTS["unlearning"])
    + "; feedback: "
    + ", ".join(LM_EXPERIMENTS["feedback"]),
    _names(regimes_lib.REGIMES),
    "a non-empty tuple of distinct names from " + ", ".join(regimes_lib.NAMES),
  ),
  "head": (
    "fused",
    "fused (the fused linear + loss, no [B, T, V] logits), softmax (the "
    "losses on the logits), hierarchical (a two-level tree of the "
    "vocabulary) or tree (a tree of any depth: config.tree, config.branching)",
    lambda v: v in LM_HEADS,
    "one of " + ", ".join(LM_HEADS),
  ),
  "num_clusters": (
    0,
    "hierarchical head: balanced clusters; 0: ceil(sqrt(vocabulary))",
    lambda v: _is_int(v) and v >= 0,
    "an int >= 0",
  ),
  "tree": (
    "huffman",
    "tree head: huffman (word2vec's, from the training text's token counts) or balanced",
    lambda v: v in TREES,
    f"one of {', '.join(TREES)}",
  ),
  "branching": (
    2,
    "tree head: children per internal node (2: a binary tree)",
    lambda v: _is_int(v) and v >= 2,
    "an int >= 2",
  ),
  "num_seeds": _like("num_seeds", 3),
  "steps": _like("steps", 800, "optimizer steps per regime"),
  "batch_size": _like("batch_size", 16, "windows per step, drawn with replacement"),
  "learning_rate": _like("learning_rate", 1e-3, "Adam's learning rate"),
  "length": (32, "tokens per window (the context)", _positive_int, "an int >= 1"),
  "width": (64, "the transformer's width", _positive_int, "an int >= 1"),
  "depth": (2, "transformer blocks", _positive_int, "an int >= 1"),
  "heads": (4, "attention heads (dividing width)", _positive_int, "an int >= 1"),
  "alpha": (
    1.0,
    "repetition: the weight of the negative term",
    lambda v: _is_number(v) and v >= 0,
    "a finite number >= 0",
  ),
  "vocab_chunk": (512, "fused head: vocabulary columns per chunk", _positive_int, "an int >= 1"),
  "prompt": (
    16,
    "repetition: prompt tokens of each greedy continuation",
    _positive_int,
    "an int >= 1",
  ),
  "generate": (32, "repetition: tokens generated after each prompt", _positive_int, "an int >= 1"),
  "num_prompts": (
    40,
    "repetition: validation prompts continued at each evaluation",
    _positive_int,
    "an int >= 1",
  ),
  "initial_steps": (
    800,
    "unlearning: mle steps on every training topic that make the start; feedback: "
    "steps on the labeled problems that make it",
    _positive_int,
    "an int >= 1",
  ),
  "forget": (4, "unlearning: training topics to forget", _positive_int, "an int >= 1"),
  "npo_beta": _like("npo_beta", 0.1),
  "task": (
    "addition",
    "feedback: the task, addition (of two config.digits-digit numbers, the answer's "
    "digits reversed) or py:PATH (a Python file that defines VOCABULARY, draw(seed) and "
    "optionally judge(prompt, answer, reference))",
    lambda v: v in LM_TASKS or (isinstance(v, str) and v.startswith("py:") and len(v) > 3),
    "addition, or py:PATH",
  ),
  "digits": (2, "feedback, addition: digits of each number", _positive_int, "an int >= 1"),
  "num_labeled": _like("num_labeled", 500, "feedback: problems given with their answers"),
  "num_unlabeled": (
    1000,
    "feedback: prompts whose sampled answers are judged, each round",
    _positive_int,
    "an int >= 1",
  ),
  "num_validation": (
    300,
    "feedback: prompts that choose the start model",
    _positive_int,
    "an int >= 1",
  ),
  "num_test": (300, "feedback: prompts of every evaluation", _positive_int, "an int >= 1"),
  "samples": (
    4,
    "feedback: answers sampled per unlabeled prompt and round",
    _positive_int,
    "an int >= 1",
  ),
  "temperature": (
    1.0,
    "feedback: the sampling temperature",
    lambda v: _is_number(v) and v > 0,
    "a finite number > 0",
  ),
  "feedback_rounds": _like(
    "feedback_rounds", 2, "feedback: rounds of sample, judge and train (config.steps each)"
  ),
  "eval_samples": (
    8,
    "feedback: answers sampled per test prompt at each evaluation, for pass@k",
    _positive_int,
    "an int >= 1",
  ),
  "select_every": (
    250,
    "feedback: steps between the start model's validations (the best one is the start)",
    _positive_int,
    "an int >= 1",
  ),
  "wreinforce_lambda": (
    0.1,
    "w_reinforce: the weight of the positive term",
    lambda v: _is_number(v) and v >= 0,
    "a finite number >= 0",
  ),
  "pmpo_alpha": (
    0.5,
    "pmpo: the weight of the accepted answers (1 - alpha: the rejected)",
    lambda v: _is_number(v) and 0 <= v <= 1,
    "a number in [0, 1]",
  ),
  "pmpo_beta": (
    0.1,
    "pmpo: the weight of KL(pi_ref || pi)",
    lambda v: _is_number(v) and v >= 0,
    "a finite number >= 0",
  ),
  "nft_epsilon": (
    0.1,
    "nft: the floor of the implicit negative policy's ratio",
    lambda v: _is_number(v) and 0 < v <= 1,
    "a number in (0, 1]",
  ),
  "simnpo_beta": (
    2.5,
    "simnpo: the inverse temperature beta",
    lambda v: _is_number(v) and v > 0,
    "a finite number > 0",
  ),
  "simnpo_gamma": (0.0, "simnpo: the margin gamma", _is_number, "a finite number"),
  "collapse": (
    3.0,
    "unlearning: retain perplexity above this times the start's is a collapse",
    lambda v: _is_number(v) and v > 0,
    "a finite number > 0",
  ),
  "logit_bound": _like("logit_bound", 1e3),
  "seed": _like("seed", 0),
  "eval_every": _like("eval_every", 200, "steps between evaluations"),
  "checkpoint_every": _like("checkpoint_every", 200),
}

# The same, for the multi-label kind.
_MULTILABEL = {
  "kind": (
    "multilabel",
    "the experiment: " + ", ".join(KINDS),
    lambda v: v == "multilabel",
    "'multilabel' here",
  ),
  "dataset": (
    "canvases",
    "canvases (digit canvases), generated (scikit-learn's "
    "make_multilabel_classification), or npz:PATH (x_train, y_train, "
    "x_val, y_val, x_test, y_test; each y a 0/1 [n, K] mask)",
    lambda v: (
      v in MULTILABEL_DATASETS or (isinstance(v, str) and v.startswith("npz:") and len(v) > 4)
    ),
    "one of " + ", ".join(MULTILABEL_DATASETS) + ", or npz:PATH",
  ),
  "regimes": (
    MULTILABEL_OBJECTIVES,
    "the objectives, each of " + ", ".join(MULTILABEL_OBJECTIVES),
    _names(MULTILABEL_OBJECTIVES),
    "a non-empty tuple of distinct names from " + ", ".join(MULTILABEL_OBJECTIVES),
  ),
  "hidden": _like("hidden", (100, 100)),
  "num_seeds": _like("num_seeds", 5),
  "steps": _like("steps", 2000, "optimizer steps per objective"),
  "batch_size": _like("batch_size", 128),
  "learning_rate": _like("learning_rate", 1e-3, "Adam's learning rate"),
  "logit_bound": _like("logit_bound", 1e3),
  "seed": _like("seed", 0),
  "eval_every": _like("eval_every", 200, "steps between evaluations"),
  "checkpoint_every": _like("checkpoint_every", 0),
}

# kind -> key -> (default, help, test, want)
TABLE = {
  "classifier": {k: (_DEFAULTS[k][0], _DEFAULTS[k][1], *_RULES[k]) for k in KEYS},
  "lm": _LM,
  "multilabel": _MULTILABEL,
}
KIND_KEYS = {kind: tuple(table) for kind, table in TABLE.items()}
ALL_KEYS = tuple(dict.fromkeys(k for keys in KIND_KEYS.values() for k in keys))
assert all(set(_COMMON) <= set(keys) for keys in KIND_KEYS.values())


def kinds_of(key: str) -> list[str]:
  """The kinds whose configs have ``key``."""
  return [kind for kind, keys in KIND_KEYS.items() if key in keys]


def check_variant(name: str, arg: str, value, variants) -> None:
  """Refuses a packaged config's variant (``NAME:VALUE``) that it does not have."""
  if value not in variants:
    raise ValueError(f"{name}:{value}: {arg} must be one of {', '.join(variants)}, got {value!r}.")


def defaults(kind: str = "classifier") -> ml_collections.ConfigDict:
  """Every key of a ``kind``'s config at its default (classifier: the feedback experiment
  on digits).

  Example:
    >>> c = defaults("lm")
    >>> c.kind, c.experiment, c.head, c.vocab_chunk
    ('lm', 'repetition', 'fused', 512)
    >>> c.head = "tree"  # then validate(c) checks it against every other key
  """
  if kind not in TABLE:
    raise ConfigError(f"config.kind: must be one of {', '.join(KINDS)}, got {kind!r}.")
  return ml_collections.ConfigDict({key: spec[0] for key, spec in TABLE[kind].items()})


def describe(kinds=KINDS) -> str:
  """Every config key of ``kinds`` with its default and what it means, for ``--help``."""
  out = []
  for kind in kinds:
    width = max(map(len, TABLE[kind]))
    out.append(
      f" {kind}"
      + (" (a config without a kind key)" if kind == "classifier" else f" (kind={kind!r})")
      + ":"
    )
    out += [
      f"  --config.{key:<{width}}  {spec[1]} (default: {spec[0]!r})"
      for key, spec in TABLE[kind].items()
    ]
  return "\n".join(out)


def _check_keys(values: dict, kind: str) -> None:
  """Unknown keys (another kind's named as such), missing keys and bad values."""
  table = TABLE[kind]
  for key in sorted(set(values) - set(table)):
    owners = kinds_of(key)
    if owners:
      raise ConfigError(
        f"config.{key}: a key of kind {' and '.join(owners)}, not of kind "
        f"{kind!r}; the {kind} keys are {', '.join(table)}."
      )
    raise ConfigError(f"config.{key}: unknown key; the keys are {', '.join(table)}.")
  for key, (_, _, test, want) in table.items():
    if key not in values:
      raise ConfigError(
        f"config.{key}: missing; start the config from "
        f"jaxsoftmax_experiments.config.defaults({kind!r})."
      )
    if not test(values[key]):
      raise ConfigError(f"config.{key}: must be {want}, got {values[key]!r}.")


def kind_of(config) -> str:
  """The kind a config names (``classifier`` for one without a ``kind`` key)."""
  kind = (config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config).get(
    "kind", "classifier"
  )
  if kind not in KINDS:
    raise ConfigError(f"config.kind: must be one of {', '.join(KINDS)}, got {kind!r}.")
  return kind


def _check_tree_keys(values: dict) -> None:
  """Refuses a tree or a branching set for a head that has no tree."""
  if values["head"] != "tree" and (values["tree"], values["branching"]) != ("huffman", 2):
    raise ConfigError(
      "config.tree, config.branching: only the tree head has a tree; set "
      "config.head='tree' or leave them at 'huffman' and 2."
    )


def validate(
  config: ml_collections.ConfigDict,
  num_train: int | None = None,
  num_classes: int | None = None,
  input_shape: tuple[int, ...] | None = None,
  memory_bytes: int | None = None,
) -> None:
  """Raises :class:`ConfigError` naming the first key that is unknown, missing or bad.

  Args:
    config: an experiment config.
    num_train: the size of the dataset's training split, when known, to check
      ``num_labeled`` against it.
    num_classes: the dataset's number of classes, when known, to check
      ``num_clusters`` against it.
    input_shape: the dataset's input shape, when known, to check the CNN's kernel and
      to estimate the memory a run needs.
    memory_bytes: the memory the runs may use; a config whose estimate passes it is
      refused, with the estimate.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"the config must be an ml_collections.ConfigDict (get_config() returns "
      f"one built on jaxsoftmax_experiments.config.defaults()), got "
      f"{type(config).__name__}."
    )
  values = config.to_dict()
  kind = kind_of(values)
  _check_keys(values, kind)
  if kind == "lm":
    return validate_lm(values)
  if kind == "multilabel":
    return None
  if values["warmup_steps"] > values["steps"]:
    raise ConfigError(
      f"config.warmup_steps: must be at most config.steps ({values['steps']}), "
      f"got {values['warmup_steps']}."
    )
  if values["feedback_rounds"] > 1 and values["protocol"] != "feedback":
    raise ConfigError(
      f"config.feedback_rounds: more than one round needs protocol 'feedback', "
      f"not {values['protocol']!r}."
    )
  for name in values["regimes"]:
    needs = regimes_lib.REGIMES[name].needs
    if regimes_lib.FLAT_LOGITS in needs and values["head"] != "softmax":
      raise ConfigError(
        f"config.regimes: {name!r} needs the softmax head's logits; use "
        f"head 'softmax' or leave {name!r} out."
      )
    if regimes_lib.TRANSITION in needs and values["protocol"] not in ("uniform", "biased"):
      raise ConfigError(
        f"config.regimes: {name!r} needs the protocol's transition matrix, "
        f"which 'uniform' and 'biased' have and {values['protocol']!r} has not."
      )
    if regimes_lib.ONE_WRONG_LABEL in needs and values["num_negatives"] > 1:
      raise ConfigError(
        f"config.regimes: {name!r} takes one wrong label per input; set "
        f"num_negatives=1 or use complement_likelihood or an mcl_* regime."
      )
  if sets_across_rounds(values):
    for name in values["regimes"]:
      if regimes_lib.ONE_WRONG_LABEL in regimes_lib.REGIMES[name].needs:
        raise ConfigError(
          f"config.feedback_sets: {name!r} takes one wrong label per input, and "
          f"{values['feedback_rounds']} feedback rounds gather sets; set "
          f"feedback_sets=False or leave {name!r} out."
        )
    if values["head"] == "hierarchical":
      raise ConfigError(
        "config.feedback_sets: the hierarchical head takes one wrong label per "
        "input; set feedback_sets=False or use head 'softmax'."
      )
  if values["num_negatives"] > 1 and values["protocol"] not in ("uniform", "biased"):
    raise ConfigError(
      f"config.num_negatives: several wrong labels per input need protocol "
      f"'uniform' or 'biased', not {values['protocol']!r}."
    )
  if values["num_negatives"] > 1 and values["head"] == "hierarchical":
    raise ConfigError(
      "config.num_negatives: the hierarchical head takes one wrong label per "
      "input; use head 'softmax' for sets."
    )
  if num_classes is not None and values["num_negatives"] > num_classes - 1:
    raise ConfigError(
      f"config.num_negatives: must be at most the {num_classes - 1} wrong labels "
      f"of {values['dataset']!r}, got {values['num_negatives']}."
    )
  if values["model"] == "cnn" and values["dataset"] == "synthetic":
    raise ConfigError("config.model: the synthetic dataset has flat features; use 'mlp'.")
  _check_tree_keys(values)
  if values["num_clusters"] and values["head"] != "hierarchical":
    raise ConfigError(
      f"config.num_clusters: only the hierarchical head has clusters; "
      f"set config.head='hierarchical' or num_clusters=0, got {values['num_clusters']}."
    )
  if num_classes is not None and values["num_clusters"] > num_classes:
    raise ConfigError(
      f"config.num_clusters: must be at most the {num_classes} classes of "
      f"{values['dataset']!r} (no empty cluster), got {values['num_clusters']}."
    )
  if num_train is not None and values["num_labeled"] > num_train:
    raise ConfigError(
      f"config.num_labeled: must be at most the {num_train} training examples "
      f"of {values['dataset']!r}, got {values['num_labeled']}."
    )
  if values["schedule"] == "cosine":
    phases = {"steps": values["steps"]}
    if values["protocol"] == "feedback":
      phases["initial_steps"] = values["initial_steps"]
    for key, steps in phases.items():
      if values["warmup_steps"] >= steps:
        raise ConfigError(
          f"config.warmup_steps: a cosine schedule needs its warmup below the "
          f"steps of every phase, but config.{key} is {steps}, got "
          f"{values['warmup_steps']}."
        )
  if input_shape is not None and values["model"] == "cnn":
    kernel = values["kernel_size"] or (5 if len(input_shape) == 1 else 3)
    if len(input_shape) not in (1, 2):
      raise ConfigError(
        f"config.model: the CNN takes 1-D or 2-D inputs, and "
        f"{values['dataset']!r} has input shape {tuple(input_shape)}; use 'mlp'."
      )
    if kernel > min(input_shape):
      raise ConfigError(
        f"config.kernel_size: the kernel ({kernel}) is larger than the input "
        f"{tuple(input_shape)} of {values['dataset']!r}."
      )
  if input_shape is not None and num_classes is not None and memory_bytes is not None:
    need = sum(estimate_bytes(values, input_shape, num_classes))
    if need > memory_bytes:
      # The layer sizes are to blame if the default batch would not fit either.
      default_batch = dict(values, batch_size=_DEFAULTS["batch_size"][0])
      too_wide = sum(estimate_bytes(default_batch, input_shape, num_classes)) > memory_bytes
      key = ("hidden" if values["model"] == "mlp" else "channels") if too_wide else "batch_size"
      raise ConfigError(
        f"config.{key}: the runs need about {need / 2**30:.1f} GiB "
        f"(parameters, optimizer state, gradients and one batch's activations, float32), "
        f"more than the {memory_bytes / 2**30:.1f} GiB available."
      )


def validate_lm(
  values: dict,
  corpus_sizes: dict[str, int] | None = None,
  memory_bytes: int | None = None,
  vocab_size: int | None = None,
) -> None:
  """The language-model kind's checks across keys, and against its data when known.

  Args:
    values: the config as a dict, its keys already checked one by one.
    corpus_sizes: tokens per split (``train``, ``validation``, ``test``) and the number of
      training topics (``train_topics``), when the data is loaded.
    memory_bytes: the memory the runs may use; a config whose estimate passes it is refused.
    vocab_size: the vocabulary's size, for the estimate.
  """
  experiment, head = values["experiment"], values["head"]
  for name in values["regimes"]:
    rule = regimes_lib.REGIMES[name]
    why = None
    if regimes_lib.LABEL_SETS in rule.needs:
      why = "needs several true labels per example (the multilabel kind), which text has not"
    elif rule.batch_objective is not None:
      why = "is a risk estimator over a batch of complementary labels, which text has not"
    elif regimes_lib.TRANSITION in rule.needs:
      why = "needs a protocol's transition matrix, which text has not"
    elif regimes_lib.FLAT_LOGITS in rule.needs and head != "softmax":
      why = f"needs the logits, which the {head} head never forms (use head 'softmax')"
    elif regimes_lib.JUDGED in rule.needs and experiment != "feedback":
      why = "trains on judged answers, which only the feedback experiment samples"
    elif regimes_lib.REFERENCE in rule.needs and experiment == "repetition":
      why = "needs a reference model, which repetition has not (unlearning and feedback have)"
    elif regimes_lib.ONE_WRONG_LABEL in rule.needs and experiment == "repetition":
      why = "takes one wrong token, and repetition's negatives are sets (the earlier tokens)"
    elif head == "hierarchical" and experiment == "repetition" and rule.negative is not None:
      why = (
        "takes sets of wrong tokens (the earlier tokens), and the hierarchical head one "
        "wrong label per example (use head 'fused' or 'softmax')"
      )
    if why:
      raise ConfigError(f"config.regimes: {name!r} {why}.")
  _check_tree_keys(values)
  if values["width"] % values["heads"]:
    raise ConfigError(
      f"config.width: must be a multiple of config.heads ({values['heads']}), "
      f"got {values['width']}."
    )
  if values["experiment"] == "repetition" and values["prompt"] >= values["length"]:
    raise ConfigError(
      f"config.prompt: must be shorter than config.length ({values['length']}), "
      f"got {values['prompt']}."
    )
  if values["experiment"] == "repetition" and values["generate"] < 4:
    raise ConfigError(
      "config.generate: seq-rep-4 counts the 4-grams of each continuation, so it needs at "
      f"least 4 generated tokens, got {values['generate']}."
    )
  if corpus_sizes is not None:
    if values["experiment"] == "unlearning" and values["forget"] >= corpus_sizes["train_topics"]:
      raise ConfigError(
        f"config.forget: must leave a training topic to retain: at most "
        f"{corpus_sizes['train_topics'] - 1} of the {corpus_sizes['train_topics']} "
        f"training topics, got {values['forget']}."
      )
    shortest = min(corpus_sizes[p] for p in ("train", "validation", "test"))
    if values["length"] >= shortest:
      raise ConfigError(
        f"config.length: every split needs a window of length + 1 tokens, and "
        f"the shortest has {shortest}; use a length below {shortest}, got "
        f"{values['length']}."
      )
    windows = (corpus_sizes["validation"] - 1) // values["length"]
    if values["experiment"] == "repetition" and values["num_prompts"] > windows:
      raise ConfigError(
        f"config.num_prompts: the validation text has {windows} windows of "
        f"{values['length']} tokens, got {values['num_prompts']}."
      )
  if memory_bytes is not None and vocab_size is not None:
    need = lm_estimate_bytes(values, vocab_size)
    if need > memory_bytes:
      one_seed = lm_estimate_bytes(dict(values, num_seeds=1, batch_size=1), vocab_size)
      key = (
        "width"
        if one_seed > memory_bytes
        else "num_seeds"
        if lm_estimate_bytes(dict(values, num_seeds=1), vocab_size) <= memory_bytes
        else "batch_size"
      )
      raise ConfigError(
        f"config.{key}: the runs need about {need / 2**30:.1f} GiB (parameters, "
        f"optimizer state, gradients and one batch's activations, float32), more "
        f"than the {memory_bytes / 2**30:.1f} GiB available."
      )


def lm_estimate_bytes(values: dict, vocab_size: int) -> int:
  """A lower estimate of the memory of all language-model runs' training, float32:
  parameters x 4 (values, Adam's two moments, gradients) and one batch's activations x 2
  (the [B, T, V] logits too with the softmax head)."""
  w, t, v = values["width"], values["length"], vocab_size
  params = 2 * v * w + t * w + values["depth"] * 12 * w * w
  activations = values["batch_size"] * t * (values["depth"] * 12 * w + values["heads"] * t)
  if values["head"] == "softmax":
    activations += values["batch_size"] * t * v
  if values["head"] == "hierarchical":
    params += v * w  # the within-cluster kernels: clusters x width x largest cluster
  if values["head"] == "tree":
    params += v * w  # the node kernels: (V - 1) / (b - 1) nodes x width x b children
  runs = len(values["regimes"]) * values["num_seeds"]
  return 4 * runs * (4 * params + 2 * activations)


# Keys that only one head reads, recorded (config.json, results.json, the checkpoints'
# fingerprint) only with that head: a run of another head records what it recorded before
# the keys existed, so its folder still resumes and its results stay byte for byte.
HEAD_KEYS = {"tree": ("tree", "branching")}
# Likewise, the keys that only the language model's feedback experiment reads.
FEEDBACK_KEYS = (
  "task",
  "digits",
  "num_labeled",
  "num_unlabeled",
  "num_validation",
  "num_test",
  "samples",
  "temperature",
  "feedback_rounds",
  "eval_samples",
  "select_every",
  "wreinforce_lambda",
  "pmpo_alpha",
  "pmpo_beta",
  "nft_epsilon",
  "simnpo_beta",
  "simnpo_gamma",
)


def recorded(values: dict) -> dict:
  """The config as a run records it: ``values`` without the keys of a head or a language
  model experiment it does not use."""
  unused = {k for head, keys in HEAD_KEYS.items() if values.get("head") != head for k in keys}
  if values.get("kind") == "lm" and values.get("experiment") != "feedback":
    unused |= set(FEEDBACK_KEYS)
  return {k: v for k, v in values.items() if k not in unused}


def sets_across_rounds(values) -> bool:
  """Whether feedback rounds gather each input's wrong predictions into one set."""
  return (
    values["protocol"] == "feedback" and values["feedback_rounds"] > 1 and values["feedback_sets"]
  )


def _widths(values, input_shape):
  """Input, hidden and output widths of the model, for the estimate."""
  size = math.prod(input_shape)
  if values["model"] == "mlp":
    return [size, *values["hidden"]]
  return [size, *(size * c // 2 ** (i + 1) for i, c in enumerate(values["channels"]))]


def estimate_bytes(values: dict, input_shape, num_classes: int) -> tuple[int, int]:
  """A lower estimate of the memory of all runs' training, float32, in two parts:
  ``(parameters x 4 (values, Adam's two moments, gradients), one batch's activations x 2)``."""
  widths = [*_widths(values, input_shape), num_classes]
  if values["model"] == "mlp":
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
  else:
    kernel = values["kernel_size"] or (5 if len(input_shape) == 1 else 3)
    chans = (1, *values["channels"])
    params = sum(kernel ** len(input_shape) * a * b + b for a, b in zip(chans[:-1], chans[1:]))
    params += widths[-2] * num_classes + num_classes
  runs = len(values["regimes"]) * values["num_seeds"]
  activations = values["batch_size"] * sum(widths)
  return 4 * runs * 4 * params, 4 * runs * 2 * activations


def available_memory() -> int:
  """The machine's physical memory in bytes (an upper bound for the CPU backend)."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
