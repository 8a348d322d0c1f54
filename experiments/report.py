"""Files an experiment leaves in its workdir, for a person and for a program.

- ``config.json``: the resolved config.
- ``metrics.jsonl``: one JSON object per evaluation per (regime, seed).
- ``results.json``: the final evaluation of every run, the config, the device count
  and the wall time.
- ``summary.md``: regime by test accuracy, test NLL, best evaluation and divergences,
  mean and sample standard deviation over seeds.
- ``curves.png``: test accuracy and training loss against step, a band over seeds.

Whole files are written atomically (a temporary file in the same folder, then a
rename), so an interrupted run never leaves a half-written one behind.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def write_atomic(path: Path, text: str | bytes) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename."""
  path = Path(path)
  data = text.encode() if isinstance(text, str) else text
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def to_json(value: Any) -> str:
  """Strict JSON (no NaN or infinity), indented."""
  return json.dumps(value, indent=2, allow_nan=False) + "\n"


def mean_std(values) -> str:
  """'mean ± sample std' of the finite values, saying how many were not finite."""
  x = np.array([np.nan if v is None else v for v in values], float)
  finite = x[np.isfinite(x)]
  if finite.size == 0:
    return "n/a"
  std = finite.std(ddof=1) if finite.size > 1 else 0.0
  missing = f" ({x.size - finite.size} not finite)" if finite.size < x.size else ""
  form = ".4g" if abs(finite.mean()) >= 1e5 else ".4f"  # a perplexity of 1e48 stays readable
  return f"{finite.mean():{form}} ± {std:{form}}{missing}"


def divergence_rule(bound: float) -> str:
  """The divergence rule of every kind, as the summaries state it."""
  return (
    f"A run diverges at the first step whose loss or gradient is not finite, whose largest "
    f"|logit| passes {bound:g} or whose loss falls below -{bound:g}; it is then frozen, "
    "and its row reports the frozen model."
  )


def summary_markdown(
  results: dict[str, Any], wall_seconds: float | None = None, resumed_from: int | None = None
) -> str:
  """The regime table of ``results``, with a line saying what was run and how long it took."""
  c = results["config"]
  lines = [
    f"# {c['protocol']} protocol on {c['dataset']}",
    "",
    f"Model {c['model']}"
    + {
      "hierarchical": " with a hierarchical softmax head",
      "fused": " with the fused head",
      "tree": f" with a {c.get('tree')} tree head of branching {c.get('branching')}",
    }.get(c.get("head"), "")
    + f", {c['num_seeds']} seeds, {c['steps']} steps"
    + (f" x {c['feedback_rounds']} rounds" if c["feedback_rounds"] > 1 else "")
    + f", batch {c['batch_size']}, {c['optimizer']} at learning rate {c['learning_rate']:g}; "
    f"{results['num_devices']} device(s)"
    + (f", {wall_seconds:.1f} s" if wall_seconds is not None else "")
    + (f" (resumed at step {resumed_from})" if resumed_from is not None else "")
    + ".",
    "",
  ]
  if "initial_model_test_accuracy" in results:
    lines += [
      f"The model that made the judged predictions ({c['num_labeled']} labels, "
      f"{c['initial_steps']} steps) had test accuracy "
      f"{mean_std(results['initial_model_test_accuracy'])}.",
      "",
    ]
  if "reference_model_test_accuracy" in results:
    lines += [
      f"npo's frozen reference model ({c['num_labeled']} labels alone, "
      f"{c['initial_steps']} steps) had test accuracy "
      f"{mean_std(results['reference_model_test_accuracy'])}.",
      "",
    ]
  lines += [
    "| regime | positives | negatives | test accuracy | test NLL | best evaluation | diverged |",
    "|---|---:|---:|---|---|---|---:|",
  ]
  for regime, r in results["regimes"].items():
    diverged = sum(r["diverged"])
    steps = [s for s in r["diverged_at_step"] if s is not None]
    where = f" (steps {min(steps)}-{max(steps)})" if steps else ""
    lines.append(
      f"| {regime} | {np.mean(r['num_positive']):.0f} | {np.mean(r['num_negative']):.0f} "
      f"| {mean_std(r['test_accuracy'])} | {mean_std(r['test_nll'])} "
      f"| {mean_std(r['best_test_accuracy'])} | {diverged}/{len(r['diverged'])}{where} |"
    )
  lines += [
    "",
    "Mean ± sample standard deviation over seeds, on the test split, at the last step; "
    "best evaluation: each seed's highest test accuracy over the evaluations (chosen on "
    "the test split, so an optimistic figure). "
    "Positives and negatives are training examples per seed. " + divergence_rule(c["logit_bound"]),
  ]
  return "\n".join(lines) + "\n"


def colours(n: int) -> list:
  """``n`` colours for as many curves: matplotlib's ten for ten or fewer, else tab20's
  twenty, so that no two regimes share one (the 12-regime table repeated two of ten)."""
  import matplotlib

  if n <= 10:
    return [f"C{i}" for i in range(n)]
  cmap = matplotlib.colormaps["tab20"]
  return [cmap(i % 20) for i in range(n)]


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
  """Test accuracy and training loss against step: the mean over seeds and a min-max band."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by_regime: dict[str, dict[int, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
  for r in records:
    by_regime[r["regime"]][r["seed"]][r["step"]] = r
  fig, axes = plt.subplots(1, 2, figsize=(13, 4))
  palette = colours(len(by_regime))
  for i, (regime, seeds) in enumerate(by_regime.items()):
    colour = palette[i]
    steps = sorted({s for runs in seeds.values() for s in runs})
    for ax, key in zip(axes, ("test_accuracy", "train_loss")):
      v = np.array(
        [
          [np.nan if runs.get(s, {}).get(key) is None else runs[s][key] for s in steps]
          for runs in seeds.values()
        ],
        float,
      )
      with warnings.catch_warnings():  # all-NaN columns: every seed diverged
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(v, 0), np.nanmin(v, 0), np.nanmax(v, 0)
      ax.plot(steps, mean, color=colour, label=regime)
      ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, linewidth=0)
  axes[0].set(
    xlabel="step", ylabel="test accuracy", title="test accuracy (mean, min-max over seeds)"
  )
  axes[1].set(
    xlabel="step", ylabel="training loss (symlog)", title="training loss (mean, min-max over seeds)"
  )
  axes[1].set_yscale("symlog", linthresh=1e-3)
  # The legend beside the plots, where it covers no curve.
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.82, 0.5), frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout(rect=(0, 0, 0.82, 1))
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  write_atomic(path, png.getvalue())
