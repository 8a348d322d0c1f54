"""Real English text that ships with Python, split by topic, and a word-level tokenizer.

The corpus is CPython's ``pydoc_data.topics``: the 79 help topics of the language
reference (about 120k tokens), in every Python install. Topics are sorted by name and
split by position: every 10th (from the 5th) is a test topic, every 10th (from the 10th)
a validation topic, the other 64 train (110505 training, 2477 validation and 6881 test
tokens). Nothing is downloaded.

The tokenizer lowercases and splits into runs of letters, runs of digits and single
other characters (punctuation, operators); the vocabulary is every token seen at least
``min_count`` times (default 3) in the training topics, by count then alphabetically,
after ``<unk>`` (id 0). With the default split that is 1788 words and symbols plus
``<unk>`` (``len(corpus().vocabulary)`` is 1789), and tokens of validation and test
topics outside it become ``<unk>``.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

UNK = "<unk>"
_TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")


def topics() -> dict[str, str]:
  """Every help topic of ``pydoc_data.topics``, by name."""
  from pydoc_data.topics import topics as texts
  return dict(sorted(texts.items()))


def split(names) -> dict[str, list[str]]:
  """Topic names by split: ``test`` every 10th from the 5th, ``validation`` every 10th
  from the 10th, ``train`` the rest."""
  names = sorted(names)
  out = {"train": [], "validation": [], "test": []}
  for i, name in enumerate(names):
    part = "test" if i % 10 == 4 else "validation" if i % 10 == 9 else "train"
    out[part].append(name)
  return out


def tokenize(text: str) -> list[str]:
  return _TOKEN.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  words: tuple[str, ...]  # id -> token; id 0 is <unk>

  @classmethod
  def build(cls, texts, min_count: int = 3) -> "Vocabulary":
    counts = collections.Counter(t for text in texts for t in tokenize(text))
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return cls((UNK, *kept))

  def __len__(self) -> int:
    return len(self.words)

  @property
  def index(self) -> dict[str, int]:
    return {w: i for i, w in enumerate(self.words)}

  def encode(self, text: str) -> np.ndarray:
    index = self.index
    return np.array([index.get(t, 0) for t in tokenize(text)], np.int32)

  def decode(self, ids) -> str:
    return " ".join(self.words[int(i)] for i in ids)


@dataclasses.dataclass(frozen=True)
class Corpus:
  vocabulary: Vocabulary
  tokens: dict[str, dict[str, np.ndarray]]  # split -> topic -> token ids

  def stream(self, part: str, names=None) -> np.ndarray:
    """The split's topics (or ``names`` of them) concatenated, in name order."""
    chosen = sorted(self.tokens[part] if names is None else names)
    return np.concatenate([self.tokens[part][n] for n in chosen])


def corpus(min_count: int = 3) -> Corpus:
  """The topics, split, with the vocabulary of the training topics."""
  texts = topics()
  parts = split(texts)
  vocab = Vocabulary.build([texts[n] for n in parts["train"]], min_count)
  return Corpus(vocab, {p: {n: vocab.encode(texts[n]) for n in names} for p, names in parts.items()})


def windows(stream: np.ndarray, length: int) -> np.ndarray:
  """Non-overlapping ``[n, length + 1]`` windows (inputs and next-token targets)."""
  count = (len(stream) - 1) // length
  idx = np.arange(count)[:, None] * length + np.arange(length + 1)[None, :]
  return stream[idx]


def previous_tokens(context, targets):
  """Welleck et al.'s token-level unlikelihood candidates ``C_t = {x_0 .. x_t} - {y_t}``:
  for target t of ``targets`` ``[..., T]`` (``y_t = x_{t+1}``), the ``context`` tokens
  ``[..., T]`` up to and including position t other than the target, ``[..., T, T]`` with
  -1 where unused (row t lists positions 0..t)."""
  import jax.numpy as jnp
  t = context.shape[-1]
  upto = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]                  # [T, T]
  tokens = jnp.broadcast_to(context[..., None, :], (*context.shape, t))    # row t: the context
  keep = upto & (tokens != targets[..., :, None])
  return jnp.where(keep, tokens, -1)
