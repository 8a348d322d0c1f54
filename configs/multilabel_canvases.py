"""Several true labels per example on digit canvases: softmax with targets Y/|Y| against
sigmoid cross-entropy, the complement terms and probability clipping.

Each canvas shows two to four of scikit-learn's 8 x 8 digits side by side and is
labelled with the set of digits shown; every objective x 5 seeds trains an MLP.

    jaxsoftmax-run --config=multilabel_canvases --workdir=runs/multilabel_canvases
"""

from jaxsoftmax_experiments import config


def get_config():
  c = config.defaults("multilabel")
  c.dataset = "canvases"
  return c.lock()
