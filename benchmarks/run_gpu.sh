#!/usr/bin/env bash
# One GPU session, inside a 10-minute limit: the GPU tests, then `ktinject bench` on random-weight
# Llama-3-8B and SmolLM2-135M shapes in bf16 against HF eager and HF static cache + torch.compile.
#
# Run from the repository root once the carried wheels are installed:
#     OUT=/some/folder bash benchmarks/run_gpu.sh
# Writes $OUT/run_gpu.log (everything below) and one JSON per bench step (5 files in all), and
# prints a summary table last. A step that fails or times out does not stop the next ones; each
# step's timeout is cut to what is left of BUDGET_S, and a bench cut short by its timeout still
# prints and writes what it measured.
set -u

OUT=${OUT:-bench-out}
BUDGET_S=${BUDGET_S:-540}  # the whole script, leaving slack under the 10-minute limit
mkdir -p "$OUT"
exec > >(tee "$OUT/run_gpu.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the CPU kernels' C++ torch operators save CPU decode time only; not worth ~15 s of device time
export KTINJECT_NATIVE=${KTINJECT_NATIVE:-ctypes}

STARTED=$SECONDS
STATUS=()

# step NAME TIMEOUT_S COMMAND...: run COMMAND under `timeout`, print its elapsed time and rc
step() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( BUDGET_S - (SECONDS - STARTED) - 20 ))  # 20 s: SIGTERM grace + summary
    (( limit > left )) && limit=$left
    if (( limit < 30 )); then
        echo "== $name: skipped, ${left}s of the budget left"
        STATUS+=("$name: skipped")
        return
    fi
    echo
    echo "== $name (timeout ${limit}s, $(( SECONDS - STARTED ))s into the run): $*"
    local began=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    echo "== $name: rc=$rc after $(( SECONDS - began ))s"
    STATUS+=("$name: rc=$rc, $(( SECONDS - began ))s")
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'

# the lead's CLI when it imports, else this benchmark's own entry point (same flags)
if python3 -c 'import ktinject.cli' 2>/dev/null; then
    BENCH=(python3 -m ktinject.cli bench)
else
    BENCH=(python3 -m ktinject.bench)
fi
COMMON=(--device cuda --dtype bfloat16 --prompt-len 128)

step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_triton_fused.py tests/test_triton_decode_attention.py tests/test_triton_gemv.py \
    tests/test_triton_experts.py tests/test_operators.py::test_experts_read_in_place_in_a_capture_match_hf

step smollm2-135m 150 "${BENCH[@]}" --shape smollm2-135m "${COMMON[@]}" --long-context 4096 \
    --new-tokens 128 --repeats 2 --baselines eager,static-compile --json "$OUT/smollm2-135m.json"

step llama3-8b-eager 110 "${BENCH[@]}" --shape llama3-8b "${COMMON[@]}" --long-context 8192 \
    --new-tokens 64 --repeats 1 --baselines eager --json "$OUT/llama3-8b-eager.json"

# the embedded GGUF cannot travel: SmolLM2's config and tokenizer with random bf16 weights
step server 100 bash -c "python3 benchmarks/random_weights.py .gpu-assets/smollm2 \
    /tmp/smollm2-random --device cuda && python3 benchmarks/bench_server.py /tmp/smollm2-random \
    --device cuda --dtype bfloat16 --history-tokens 4000 --repeats 2 --streams 8 \
    --stream-tokens 512 --out $OUT/server.json"

# both decode graphs the engine chooses between (separate kernels / fused Triton projections and
# attention), and prefills of 128 and 4,096 tokens, kernel by kernel, for the next round of speed
# work (SmolLM2's 4k prefill ran at 0.85x HF eager on 2026-11-27)
step profile-smollm2 60 python3 benchmarks/profile_decode.py --shape smollm2-135m \
    --dtype bfloat16 --top 12

# one Qwen3-30B-A3B layer's experts per decode step: HF's loop, torch's gathered copies, and
# the in-place Triton kernels (operators/triton/experts.py), graph-captured
step experts 45 python3 benchmarks/bench_gpu_experts.py --out "$OUT/gpu-experts.json"

# HF's compile of the 8B decode step took 74 s on an H200 before: one round, last in line
step llama3-8b-static-compile 240 "${BENCH[@]}" --shape llama3-8b "${COMMON[@]}" \
    --long-context 8192 --new-tokens 64 --repeats 1 --baselines static-compile \
    --json "$OUT/llama3-8b-static.json"

echo
echo "== summary ($(( SECONDS - STARTED ))s in all)"
for line in "${STATUS[@]}"; do echo "  $line"; done
shopt -s nullglob
results=("$OUT"/smollm2-*.json "$OUT"/llama3-8b-*.json)
if (( ${#results[@]} )); then
    python3 benchmarks/summarize.py "${results[@]}"
fi
