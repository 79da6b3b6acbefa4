#!/bin/bash
# Downloads, into .whl/, the wheels benchmarks/accelerator.sh needs on a CUDA machine
# whose Python 3.12 already has jax (CUDA), flax, optax, orbax, transformers and torch
# but no network: the packages the benchmark imports beyond those. Run where pip can
# reach a registry; .whl/ is ignored by git (.gitignore) and travels with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl \
  grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker
ls .whl
