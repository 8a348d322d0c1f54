"""The MNIST-1D paper's supervised baselines: all 4000 training labels, no negatives.

Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (ICML 2024), report
68% test accuracy for their MLP and 94% for their CNN. Their training setup: Adam at
learning rate 1e-2, batch 100, 6000 steps. Pick the model with the config argument:

    jaxsoftmax-run --config=mnist1d_supervised:mlp --workdir=runs/mnist1d_mlp
    jaxsoftmax-run --config=mnist1d_supervised:cnn --workdir=runs/mnist1d_cnn
"""

from jaxsoftmax_experiments import config

# The models of ``mnist1d_supervised:MODEL``; the first is the default.
VARIANTS = ("mlp", "cnn")


def get_config(model=VARIANTS[0]):
  config.check_variant("mnist1d_supervised", "model", model, VARIANTS)
  c = config.defaults()
  c.dataset = "mnist1d"
  c.protocol = "supervised"
  c.model = model
  c.hidden = (100, 100)
  c.channels = (25, 25, 25)
  c.regimes = ("positive_only",)
  c.steps = 6000
  c.batch_size = 100
  c.learning_rate = 1e-2
  c.eval_every = 500
  return c.lock()
