"""jaxsoftmax: exact softmax-family losses for training from positive and negative feedback."""

from jaxsoftmax import losses
from jaxsoftmax.losses import *  # noqa: F403 - every loss, also at the top level

__version__ = "0.1.0"

__all__ = ("losses", *losses.__all__, "__version__")
