#!/usr/bin/env bash
# The GPU checks behind the README's GPU results, in one script (at LLaVA-1.5-7B's shape most of the time goes into
# compiling). Steps, in this order (the one result still missing first), each with a time limit in seconds:
#   prefill (T_PREFILL, 300): the batch-1 prefill benchmark with `compile_prefill(mode="reduce-overhead")` (time to
#           first token; batch 8 met its target without CUDA graphs, and each batch size costs minutes of compiling);
#   tests   (T_TESTS, 180): tests/test_cuda.py (low-precision equivalence with Llava, fused attention kernels,
#           batched == per-row, compiled decoding and the compiled prefill under CUDA graphs, a prefill's
#           synchronisations);
#   profile (T_PROFILE, 110): where a batch-1 prefill's time goes (examples/profile_prefill.py: launches, GPU time;
#           it compiles again, from inductor's on-disk cache);
#   decode  (T_DECODE, 180): batch-1 decoding, our compiled mode against transformers' static cache + compile.
# STEPS picks them (default "prefill tests profile": 9.8 minutes at most); PRESET and DTYPE another bench preset and
# dtype (default llava-1.5-7b, float16; sdpa, random weights), PYTHON the interpreter. Usage:
#     bash examples/gpu_check.sh [OUTPUT_DIR]      # default: gpu-check; each step writes OUTPUT_DIR/STEP.log
# A step that fails or runs out of time does not stop the next one.
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

steps=" ${STEPS:-prefill tests profile} "

step() {
    local name=$1 limit=$2
    shift 2
    [[ $steps == *" $name "* ]] || return 0
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "$name: exit status $? after ${SECONDS}s"
}

shape=(--preset "${PRESET:-llava-1.5-7b}" --dtype "${DTYPE:-float16}")
step prefill "${T_PREFILL:-300}" "$python" examples/benchmark.py "${shape[@]}" --prefill-batch-sizes 1 \
    --decode-batch-sizes --sweep-keep-rates --compile-prefill --compile-prefill-mode reduce-overhead --warmup 2 \
    --repeats 10 --no-progress --force --output "$out/prefill.json"
step tests "${T_TESTS:-180}" "$python" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs -W default
step profile "${T_PROFILE:-110}" "$python" examples/profile_prefill.py "${shape[@]}" --compile-prefill \
    --compile-mode reduce-overhead --output-dir "$out"
step decode "${T_DECODE:-180}" "$python" examples/benchmark.py "${shape[@]}" --prefill-batch-sizes \
    --sweep-keep-rates --decode-batch-sizes 1 --new-tokens 256 --baselines compiled --our-modes compiled \
    --output-keep-pattern alternate --decode-repeats 2 --no-progress --force --output "$out/decode.json"
