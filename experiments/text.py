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
import hashlib
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
  return _split_corpus(topics(), min_count)


def _split_corpus(texts: dict[str, str], min_count: int) -> Corpus:
  parts = split(texts)
  vocab = Vocabulary.build([texts[n] for n in parts["train"]], min_count)
  return Corpus(
    vocab, {p: {n: vocab.encode(texts[n]) for n in names} for p, names in parts.items()}
  )


def digest(path: str) -> str:
  """A hash of what :func:`user_corpus` reads at ``path``: the names and bytes of a
  folder's ``.txt`` files, or a file's bytes ('' where there is nothing to read, so that
  the corpus's own error is raised)."""
  from pathlib import Path

  root, h = Path(path), hashlib.sha256()
  for p in _text_files(root) if root.is_dir() else [root]:
    try:
      h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    except OSError:
      return ""
  return h.hexdigest()


def user_corpus(path: str, min_count: int = 3) -> Corpus:
  """A user's text as a corpus split and tokenised as the help topics are: a folder's
  ``.txt`` files (searched recursively) are its topics, by relative path; a single file's
  topics are its paragraphs (blocks between blank lines). It needs at least 10 topics, so
  that the validation and test splits hold one each.

  Raises:
    data.DataError: naming the file that cannot be read or the shortfall.
  """
  from pathlib import Path

  from jaxsoftmax_experiments.data import DataError

  root = Path(path)
  if root.is_dir():
    texts = {str(p.relative_to(root)): _read(p) for p in _text_files(root)}
  elif root.is_file():
    paragraphs = [b.strip() for b in re.split(r"\n\s*\n", _read(root)) if b.strip()]
    texts = {f"{i:06d}": b for i, b in enumerate(paragraphs)}
  else:
    raise DataError(f"text:{path}: no such file or folder.")
  texts = {n: t for n, t in texts.items() if tokenize(t)}
  if len(texts) < 10:
    raise DataError(
      f"text:{path}: {len(texts)} topics (files of a folder, paragraphs of a file) "
      "with text; it needs at least 10, so that every 10th can be a validation "
      "and a test topic."
    )
  return _split_corpus(texts, min_count)


def _text_files(folder) -> list:
  """A folder's topics for :func:`user_corpus`: its ``.txt`` files, searched recursively."""
  return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def _read(path) -> str:
  from jaxsoftmax_experiments.data import DataError

  try:
    return path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"text:{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
  except OSError as e:
    raise DataError(f"text:{path}: cannot read it ({e.strerror}).") from None


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
  upto = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, T]
  tokens = jnp.broadcast_to(context[..., None, :], (*context.shape, t))  # row t: the context
  keep = upto & (tokens != targets[..., :, None])
  return jnp.where(keep, tokens, -1)
