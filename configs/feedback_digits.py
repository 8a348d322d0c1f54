"""The default experiment: feedback on a model's predictions, digits, three regimes.

A model trained on 100 true labels predicts the rest of the 1347 training digits; a
judge marks each prediction right (a positive example) or wrong (a negative example,
"not that label"). Each regime then trains an MLP on those examples, 5 seeds at once.

    jaxsoftmax-run --config=feedback_digits --workdir=runs/feedback_digits

``configs/feedback_digits.py:hierarchical`` gives the MLP a hierarchical softmax head
(a balanced tree of the 10 classes in 4 clusters) in place of its softmax layer;
``configs/feedback_digits.py:tree`` a binary Huffman tree of the classes' training
counts (``--config.tree=balanced``, ``--config.branching=3`` for others).
"""

from jaxsoftmax_experiments import config

# The output heads of ``feedback_digits:HEAD``; the first is the default.
VARIANTS = ("softmax", "hierarchical", "tree")


def get_config(head=VARIANTS[0]):
  config.check_variant("feedback_digits", "head", head, VARIANTS)
  c = config.defaults()
  c.head = head
  c.dataset = "digits"
  c.protocol = "feedback"
  c.model = "mlp"
  c.num_labeled = 100
  c.steps = 1000
  return c.lock()
