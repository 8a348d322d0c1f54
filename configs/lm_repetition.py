"""Token unlikelihood against repetition (Welleck et al. 2019), from a random start.

A small decoder-only transformer on CPython's help topics; three regimes x 3 seeds:

- ``mle``: the NLL of each next token.
- ``unlikelihood``: ``mle`` plus ``alpha * -log(1 - P(C_t))``, with C_t the window's
  tokens before position t other than its target.
- ``negated``: ``mle`` plus ``alpha * log P(C_t)`` on the same negatives (the naive
  negated gradient).

    jaxsoftmax-run --config=lm_repetition --workdir=runs/lm_repetition
"""

from jaxsoftmax_experiments import config


def get_config():
  c = config.defaults("lm")
  c.experiment = "repetition"
  c.regimes = config.LM_EXPERIMENTS["repetition"]
  return c.lock()
