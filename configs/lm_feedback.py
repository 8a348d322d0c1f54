"""Judged generations: a language model's own answers to two-digit additions, judged
right or wrong, and the ways to learn from them, in one table.

A small transformer learns ``"07+45=" -> "250"`` (the sum's digits reversed) from the
labeled problems (the start, chosen on validation exact match); each round it samples
answers to the unlabeled prompts, a judge marks them, and every regime trains on the
labeled problems, the right answers and the wrong ones. Later rounds sample from each
regime's own model.

    jaxsoftmax-run --config=lm_feedback --workdir=runs/lm_feedback
"""

from jaxsoftmax_experiments import config


def get_config():
  c = config.defaults("lm")
  c.experiment = "feedback"
  c.regimes = config.LM_EXPERIMENTS["feedback"]
  c.head = "softmax"
  c.batch_size = 64
  c.initial_steps = 3000
  c.select_every = 250
  c.steps = 300
  c.feedback_rounds = 2
  c.eval_every = 150
  c.checkpoint_every = 150
  return c.lock()
