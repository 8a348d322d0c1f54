"""The experiment on 8 simulated CPU devices, in a subprocess (XLA_FLAGS must be set
before JAX starts): the same accuracies as on one device, and arrays really split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jaxsoftmax_experiments import config as config_lib, data, loop, parallel, protocols, training

events = []
jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: events.append(name))
compiles = lambda: sum(e == "/jax/core/compile/backend_compile_duration" for e in events)
out = {"device_count": jax.device_count()}
c = config_lib.defaults()
c.dataset, c.hidden, c.steps, c.eval_every, c.initial_steps = "synthetic", (16,), 60, 20, 40
c.num_seeds, c.num_labeled, c.batch_size = 2, 60, 32        # 6 runs: a 2 x 4 mesh on 8 devices
config_lib.validate(c)
ds = data.load("synthetic")
for name, devices in (("one", jax.devices()[:1]), ("eight", None)):
  plan = loop.make_plan(c, ds, devices)
  *_, last = loop.run(plan)
  r = loop.results(plan, jax.device_get(loop.light(last, examples=True)))
  out[name] = {"num_devices": r["num_devices"],
               "accuracy": {k: v["test_accuracy"] for k, v in r["regimes"].items()},
               "nll": {k: v["test_nll"] for k, v in r["regimes"].items()},
               "initial": r["initial_model_test_accuracy"]}

# Shardings of the training state and of what a step computes: 6 runs are 3 regime groups of
# 2 seeds; 5 runs are one group of 5.
for runs, regimes in ((6, ("positive_only", "negated_gradient", "complement_likelihood")),
                      (5, ("positive_only",))):
  c.num_seeds = runs // len(regimes)
  setup = training.make_setup(c, ds, regimes=regimes, total_steps=60)
  mesh, fns = setup.mesh, training.functions(setup)
  keys = jax.random.split(jax.random.key(0), runs).reshape(len(regimes), -1)
  state = fns.init(keys, keys)
  y = jnp.asarray(ds.y_train)
  ex = jax.tree.map(lambda a: jnp.stack([a] * c.num_seeds), protocols.supervised(y))
  examples = parallel.put((ex,) * len(regimes), parallel.run_sharding(mesh))
  x = parallel.put(jnp.asarray(ds.x_train), parallel.replicated(mesh))
  state, stats = fns.train(state, examples, x, length=3)
  leaves = [jax.tree.leaves(group.params)[0] for group in state]
  rows = {}  # how many runs' parameters each device holds, over every group
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      rows[shard.device] = rows.get(shard.device, 0) + shard.data.shape[0]
  compiled = fns.train.lower(state, examples, x, length=3).compile()
  out[f"runs{runs}"] = {
      "mesh": dict(mesh.shape),
      "param_spec": list(leaves[0].sharding.spec),
      "param_devices": len(leaves[0].sharding.device_set),
      "param_shard_rows": sorted(set(rows.values())),
      "examples_spec": list(examples[0].label.sharding.spec),
      "stats_spec": list(stats[0].loss.sharding.spec),
      "x_train_replicated": x.sharding.is_fully_replicated,
      "all_reduce": "all-reduce" in compiled.as_text(),
  }
  before = compiles()
  for _ in range(3):
    state, _ = fns.train(state, examples, x, length=3)  # later calls: no new program
  out[f"runs{runs}"]["compiles_in_later_calls"] = compiles() - before
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_devices():
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
    [sys.executable, "-c", WORKER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


def test_sharded_run_matches_the_single_device_run(eight_devices):
  one, eight = eight_devices["one"], eight_devices["eight"]
  assert eight_devices["device_count"] == 8
  assert one["num_devices"] == 1 and eight["num_devices"] == 8
  assert eight["initial"] == pytest.approx(one["initial"], abs=1e-6)
  for regime, accuracy in one["accuracy"].items():
    # Test accuracies are counts over 250 examples: float tolerance means equal.
    assert eight["accuracy"][regime] == pytest.approx(accuracy, abs=1e-6), regime
    assert eight["nll"][regime] == pytest.approx(one["nll"][regime], rel=1e-3), regime


def test_runs_split_over_devices_and_each_batch_over_the_rest(eight_devices):
  six = eight_devices["runs6"]
  # 6 runs on 8 devices: gcd(6, 8) = 2 groups of runs, each run's batch over 4 devices.
  assert six["mesh"] == {"runs": 2, "batch": 4}
  assert six["param_spec"] == ["runs"] and six["param_devices"] == 8
  assert six["param_shard_rows"] == [3]  # each device holds 3 of the 6 runs' parameters
  assert six["examples_spec"] == ["runs"]
  assert six["stats_spec"] == [None, "runs"]
  assert six["x_train_replicated"]
  assert six["all_reduce"]  # the batch axis reduces gradients across its devices


def test_runs_that_do_not_divide_are_data_parallel_only(eight_devices):
  five = eight_devices["runs5"]
  assert five["mesh"] == {"runs": 1, "batch": 8}
  assert five["param_shard_rows"] == [5] and five["param_devices"] == 8  # replicated
  assert five["all_reduce"]


def test_nothing_recompiles_after_the_first_call(eight_devices):
  for key in ("runs6", "runs5"):
    assert eight_devices[key]["compiles_in_later_calls"] == 0
