#!/usr/bin/env bash
# The GPU check: on one NVIDIA GPU, with no package index reachable, run the library's
# tests and shrunk loss and fused-loss benchmarks against optax, in minutes, and write
# every table to one folder.
#
#   bash experiments/benchmarks/gpu_check.sh [OUTDIR]      (default: gpu_check/)
#
# It needs jax with CUDA, numpy, optax, chex, pytest and mpmath (the float64 references
# of the tests) installed or in .gpu_extras/; the project itself is used from this
# source tree (nothing is installed). Files written: versions.txt, tests.txt,
# losses.md, fused.md, summary.txt.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The two import names from the source tree, as pyproject.toml's package-dir maps them.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
ln -s "$root/jaxsoftmax" "$site/jaxsoftmax"
mkdir "$site/jaxsoftmax_experiments"
for f in "$root"/experiments/*; do ln -s "$f" "$site/jaxsoftmax_experiments/"; done
ln -s "$root/configs" "$site/jaxsoftmax_experiments/configs"
# Pure-Python packages the machine lacks (mpmath, ml_collections) may travel with the
# tree in .gpu_extras/ (e.g. copied from a venv's site-packages).
extras=""
[ -d "$root/.gpu_extras" ] && extras=":$root/.gpu_extras"
export PYTHONPATH="$site$extras${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"

python - > "$out/versions.txt" 2>&1 <<'PY'
import importlib.metadata as md, jax
print("devices:", jax.devices())
for d in jax.devices():
  print("device kind:", d.device_kind)
for p in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "optax", "flax", "chex",
          "numpy", "pytest", "mpmath", "orbax-checkpoint"):
  try:
    print(p, md.version(p))
  except md.PackageNotFoundError:
    print(p, "not installed")
PY
cat "$out/versions.txt"
status=0

# The library's tests (the losses and the models): no experiment runs, no xdist.
libs=(tests/losses tests/test_models.py --ignore=tests/losses/test_fused_mesh.py)
python -c "import xdist" 2>/dev/null && libs+=(-n 8)
timeout 330 python -m pytest -q -o addopts="" -p no:cacheprovider "${libs[@]}" \
  > "$out/tests.txt" 2>&1 || status=1
tail -3 "$out/tests.txt"

# The loss benchmark, shrunk: the four shapes, 10 rounds; float32 and bfloat16.
timeout 150 python -m experiments.benchmarks.losses --rounds 10 \
  > "$out/losses.md" 2>&1 || status=1
# The fused losses against optax on h @ w, at two vocabulary sizes.
timeout 150 python -m experiments.benchmarks.fused --rounds 3 \
  --sizes 8192,1024,32768 4096,1024,131072 --dtypes float32 bfloat16 \
  > "$out/fused.md" 2>&1 || status=1

{ echo "status: $status (0: every step finished)"; tail -1 "$out/tests.txt"; } > "$out/summary.txt"
cat "$out/summary.txt"
exit $status
