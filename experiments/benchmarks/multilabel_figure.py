"""The multi-label guide's figure of cross-entropy's push on a confidently wrong true logit, exact
against clipped: ``python -m experiments.benchmarks.multilabel_figure PATH``
(default ``multilabel_gradients.png``)."""

import sys

from jaxsoftmax_experiments.kinds.multilabel import gradient_figure

if __name__ == "__main__":
  path = sys.argv[1] if len(sys.argv) > 1 else "multilabel_gradients.png"
  gradient_figure(path)
  print(f"Wrote {path}")
