#!/usr/bin/env bash
# A short GPU session for planning: re-run the GPU tests, then profile one decode step of the
# SmolLM2 and Llama-3-8B shapes and the server's per-token path. Writes $OUT/profile_gpu.log.
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/profile_gpu.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

run() { local began=$SECONDS; echo "== $*"; timeout --kill-after=10 "$@"; echo "== rc=$? after $(( SECONDS - began ))s"; }

run 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_triton_fused.py::test_low_precision_rounding_points
run 60 python3 benchmarks/profile_decode.py --shape smollm2-135m --dtype bfloat16
run 90 python3 benchmarks/profile_decode.py --shape llama3-8b --dtype bfloat16 --prompt-len 8192
run 90 bash -c "python3 benchmarks/random_weights.py .gpu-assets/smollm2 /tmp/smollm2-random \
    --device cuda && python3 benchmarks/profile_server.py /tmp/smollm2-random --device cuda \
    --dtype bfloat16"
