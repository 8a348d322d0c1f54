"""The language model and the multi-label study on 8 simulated CPU devices, in a
subprocess (XLA_FLAGS must be set before JAX starts): each kind's seeds split over the
runs axis and its batches over the batch axis give the one-device results. A module of its
own, so that it runs beside the classifier's mesh tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from kinds_common import small_text

ROOT = Path(__file__).resolve().parents[2]

KINDS_WORKER = r"""
import json, sys
import jax, numpy as np
from jaxsoftmax_experiments import config as config_lib, kinds

def tiny(kind):
  c = config_lib.defaults("lm" if kind == "lm_feedback" else kind)
  c.num_seeds, c.steps, c.eval_every, c.batch_size = 2, 10, 10, 8
  if kind == "lm_feedback":  # the language model's judged answers, one round
    c = config_lib.defaults("lm")
    c.num_seeds, c.steps, c.eval_every, c.batch_size = 2, 10, 10, 8
    c.experiment, c.regimes, c.head = "feedback", ("labeled_only", "nft"), "softmax"
    c.num_labeled, c.num_unlabeled, c.num_validation, c.num_test = 40, 16, 8, 8
    c.samples, c.eval_samples, c.initial_steps, c.select_every = 2, 2, 20, 20
    c.feedback_rounds, c.width, c.depth, c.heads, c.learning_rate = 1, 16, 1, 2, 1e-2
  elif kind == "lm":  # one regime, a short start, 20 topics: the mesh is what is tested
    c.experiment, c.regimes = "unlearning", ("complement_likelihood",)
    c.dataset, c.forget = "text:" + sys.argv[1], 2
    c.length, c.width, c.depth, c.heads, c.vocab_chunk, c.initial_steps = 8, 16, 1, 2, 256, 5
    c.learning_rate = 1e-2
  else:
    c.dataset, c.hidden, c.regimes = "generated", (8,), ("sigmoid", "softmax_y_over_size")
  return c

out = {}
for name in ("lm", "multilabel", "lm_feedback"):
  c = tiny(name)
  kind = kinds.get("lm" if name == "lm_feedback" else name)
  data = kind.load(c)
  for label, devices in (("one", jax.devices()[:1]), ("eight", None)):
    plan = kind.plan(c, data, devices)
    records = []
    for state in kind.run(plan):
      records += kind.records(plan, kind.host(plan, state), records)
    leaf = jax.tree.leaves(state.runs[0])[0]
    results, _, _ = kind.outputs(plan, state, records, c.to_dict(), 0.0, None)
    key = {"lm": "forget_nll", "lm_feedback": "answer_nll"}.get(name, "mAP")
    out[f"{name}_{label}"] = {
        "num_devices": results["num_devices"],
        "devices_holding_params": len(leaf.sharding.device_set),
        "values": {r: v[key] for r, v in
                   results["objectives" if name == "multilabel" else "regimes"].items()}}
print("RESULT " + json.dumps(out))
"""


def test_every_kind_splits_over_the_mesh_and_matches_one_device():
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    [sys.executable, "-c", KINDS_WORKER, str(small_text())],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
  for name in ("lm", "multilabel", "lm_feedback"):
    one, eight = out[f"{name}_one"], out[f"{name}_eight"]
    # 2 seeds x batch 8 on 8 devices: a 2 x 4 mesh; every device holds a seed's parameters.
    assert (one["num_devices"], eight["num_devices"]) == (1, 8), name
    assert eight["devices_holding_params"] == 8, name
    for regime, values in one["values"].items():
      np.testing.assert_allclose(eight["values"][regime], values, rtol=2e-3, err_msg=name)
