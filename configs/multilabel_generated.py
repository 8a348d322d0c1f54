"""The multi-label study on scikit-learn's make_multilabel_classification (3000 examples,
20 features, 10 classes, 3 labels on average).

    jaxsoftmax-run --config=multilabel_generated --workdir=runs/multilabel_generated
"""

from jaxsoftmax_experiments import config


def get_config():
  c = config.defaults("multilabel")
  c.dataset = "generated"
  return c.lock()
