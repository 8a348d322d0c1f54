"""jaxsoftmax: exact softmax-family losses for training from positive and negative feedback."""

from jaxsoftmax import losses
from jaxsoftmax.losses import complement_nll
from jaxsoftmax.losses import complement_set_nll
from jaxsoftmax.losses import forward_nll
from jaxsoftmax.losses import fused_complement_nll
from jaxsoftmax.losses import fused_complement_set_nll
from jaxsoftmax.losses import fused_nll
from jaxsoftmax.losses import fused_set_nll
from jaxsoftmax.losses import hierarchical_complement_nll
from jaxsoftmax.losses import hierarchical_log_softmax
from jaxsoftmax.losses import hierarchical_nll
from jaxsoftmax.losses import mcl_exp
from jaxsoftmax.losses import mcl_mae
from jaxsoftmax.losses import multilabel_softmax_cross_entropy
from jaxsoftmax.losses import negated_nll
from jaxsoftmax.losses import nll
from jaxsoftmax.losses import pairwise_comparison
from jaxsoftmax.losses import scl_exp
from jaxsoftmax.losses import set_nll
from jaxsoftmax.losses import sigmoid_binary_cross_entropy
from jaxsoftmax.losses import soft_cross_entropy
from jaxsoftmax.losses import tree_complement_nll
from jaxsoftmax.losses import tree_complement_set_nll
from jaxsoftmax.losses import tree_log_softmax
from jaxsoftmax.losses import tree_nll
from jaxsoftmax.losses import tree_set_nll

__version__ = "0.1.0"
