"""Exact softmax-family losses, each a pure function with a ``jax.custom_vjp`` rule.

Classes lie on the last axis; every loss returns per-example values (the caller
reduces); the flat losses take a keyword-only ``where`` mask over classes. The
hierarchical losses take a head's cluster and within-cluster logits and a
:class:`jaxsoftmax.tree.ClassTree`; the tree losses take node (or path) logits and a
:class:`jaxsoftmax.tree.Tree` of any depth.
"""

from jaxsoftmax.losses._complementary import (
  forward_nll,
  mcl_exp,
  mcl_mae,
  pairwise_comparison,
  scl_exp,
)
from jaxsoftmax.losses._fused import (
  fused_complement_nll,
  fused_complement_set_nll,
  fused_nll,
  fused_set_nll,
)
from jaxsoftmax.losses._hierarchical import (
  hierarchical_complement_nll,
  hierarchical_log_softmax,
  hierarchical_nll,
)
from jaxsoftmax.losses._label import complement_nll, negated_nll, nll
from jaxsoftmax.losses._sequence import (
  fused_sequence_complement_nll,
  fused_sequence_complement_set_nll,
  fused_sequence_nll,
  sequence_complement_nll,
  sequence_complement_set_nll,
  sequence_nll,
)
from jaxsoftmax.losses._set import complement_set_nll, set_nll
from jaxsoftmax.losses._sigmoid import sigmoid_binary_cross_entropy
from jaxsoftmax.losses._soft import multilabel_softmax_cross_entropy, soft_cross_entropy
from jaxsoftmax.losses._tree import (
  tree_complement_nll,
  tree_complement_set_nll,
  tree_log_softmax,
  tree_nll,
  tree_set_nll,
)

__all__ = (
  "complement_nll",
  "complement_set_nll",
  "forward_nll",
  "fused_complement_nll",
  "fused_complement_set_nll",
  "fused_nll",
  "fused_sequence_complement_nll",
  "fused_sequence_complement_set_nll",
  "fused_sequence_nll",
  "fused_set_nll",
  "hierarchical_complement_nll",
  "hierarchical_log_softmax",
  "hierarchical_nll",
  "mcl_exp",
  "mcl_mae",
  "multilabel_softmax_cross_entropy",
  "negated_nll",
  "nll",
  "pairwise_comparison",
  "scl_exp",
  "sequence_complement_nll",
  "sequence_complement_set_nll",
  "sequence_nll",
  "set_nll",
  "sigmoid_binary_cross_entropy",
  "soft_cross_entropy",
  "tree_complement_nll",
  "tree_complement_set_nll",
  "tree_log_softmax",
  "tree_nll",
  "tree_set_nll",
)
