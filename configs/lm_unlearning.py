"""Unlearning (Zhang et al. 2024): forget 4 training topics of a trained start, keep the rest.

A model trained with ``mle`` on every training topic for ``initial_steps`` is the start
and the frozen reference; each regime adds the retain NLL to:

- ``gradient_ascent``: minus the forget NLL (the negated gradient);
- ``complement``: ``-log(1 - p_t)`` of each forget token;
- ``npo``: ``(2/beta) log(1 + (pi(x) / pi_ref(x))^beta)`` per forget window.

    jaxsoftmax-run --config=lm_unlearning --workdir=runs/lm_unlearning
"""

from jaxsoftmax_experiments import config


def get_config():
  c = config.defaults("lm")
  c.experiment = "unlearning"
  c.regimes = config.LM_EXPERIMENTS["unlearning"]
  c.steps = 200
  c.eval_every = 50
  c.checkpoint_every = 50
  return c.lock()
