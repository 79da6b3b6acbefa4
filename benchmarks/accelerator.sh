#!/bin/bash
# The accelerator benchmark, in bfloat16 on one CUDA GPU, in one call of under 10
# minutes: the SFT step's MFU for GPT-2 small and the 1.3B GPT-3 XL shape, the sampler
# against transformers' generate at batch 1 / 8 / 32, one PPO iteration, and the
# allocators' measured peaks next to the compiled programs' own memory analysis.
#
#   bash benchmarks/fetch_wheels.sh    # where pip reaches a registry: wheels into .whl/
#   bash benchmarks/accelerator.sh OUT # on the GPU machine, .whl/ next to the tree
#
# The machine needs Python 3.12 with jax (CUDA), flax, optax, orbax, transformers and
# torch; the rest arrives as the wheels. Writes OUT/<variant>.json (the benchmark's JSON,
# configs/benchmark.py:gpu_gpt2 and :gpu_1_3b), logs, nvidia-smi's report and the
# memory report of the 1.3B shape compiled for that GPU. Figures go to
# docs/performance.md ("Accelerator").
set -uo pipefail
out=${1:-${OUT:-/tmp/accelerator}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# jax and torch share the GPU: jax takes memory as it needs it (not 75% up front), so
# torch's 1.3B models fit beside it and the allocator's peak is what jax used.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tee "$out/versions.txt"
status=0
for variant in gpu_gpt2 gpu_1_3b; do
  timeout 260 python3 -m experiments.benchmark --config="configs/benchmark.py:$variant" \
    --config.output="$out/$variant.json" > "$out/$variant.log" 2>&1 || status=1
  tail -30 "$out/$variant.log"
done
timeout 60 python3 -m experiments.memory_report --config=configs/memory.py \
  "--config.models=('gpt3_xl_1_3b',)" --config.scan_layers=True --config.remat=full \
  --config.logits_chunk=128 --workdir="$out/memory" > "$out/memory.log" 2>&1 || status=1
tail -8 "$out/memory.log"
exit $status
