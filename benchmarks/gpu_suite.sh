#!/bin/bash
# The GPU measurements still to record, in batches that fit one device call (600 s each), every step under its own
# timeout so that one slow step leaves the others' results. Results go to $OUT/r (the device tool's output folder;
# default ./gpu_results), named with the card (h100 or h200); copy them into benchmarks/results/ afterwards.
#
#   bash benchmarks/gpu_suite.sh 1   # GPU tests (kernels, decode paths, layers split over cuda:0 and the CPU), then
#                                    # default_decode at 32k and 128k
#   bash benchmarks/gpu_suite.sh 2   # MInference prefill at 128k, Quest's profile, the 1M-token chunked prefill
#   bash benchmarks/gpu_suite.sh 3   # 32k generated tokens under DecodingPress(SnapKV) and without compression
#
# On a machine without network whose Python lacks this project's dependencies, download their wheels elsewhere
# (pydantic, pydantic-core, annotated-types, typing-inspection, gguf, pytest, pluggy, iniconfig, hypothesis,
# sortedcontainers, attrs, accelerate, psutil) into .whl/, then before this script:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels:$PWD/evaluation
set -u
OUT=${OUT:-gpu_results}
R=$OUT/r
mkdir -p "$R"
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -q H200 && echo h200 || echo h100)
echo "CARD=$CARD $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"

step() {  # step SECONDS NAME COMMAND...: run one measurement under a timeout, log its tail
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$R/$name.log" 2>&1
    echo "rc=$?"
    grep -v Warning "$R/$name.log" | tail -25
}

case "${1:-1}" in
1)
    step 100 kernel_tests python3 -m pytest -q -x tests/kernels -k "page or block_sparse or sparse_pattern or select" \
        -p no:cacheprovider
    step 110 decode_tests python3 -m pytest -q tests/sparse_prefill tests/generation/test_decode.py \
        tests/presses/test_decoding_press.py tests/presses/test_quest_press.py -p no:cacheprovider
    step 60 device_map_tests python3 -m pytest -q tests/test_device_map.py -p no:cacheprovider
    step 360 default_decode python3 benchmarks/default_decode.py --contexts 32768 131072 \
        --out "$R/default_decode_$CARD.json"
    ;;
2)
    step 200 sparse_prefill python3 benchmarks/sparse_prefill.py --context 131072 --model \
        --out "$R/sparse_prefill_128k_$CARD.json"
    step 120 quest_profile python3 benchmarks/quest_decode.py --context 131072 --profile 5 \
        --only quest quest_topk full --out "$R/quest_decode_profile_$CARD.json"
    step 260 chunked_1m python3 benchmarks/chunked_prefill.py --context 1048576 --variants chunked \
        --target-size 8192 --out "$R/chunked_prefill_1m_$CARD.json"
    ;;
3)
    step 330 bounded_decoding python3 benchmarks/decoding_bounded_memory.py --variant decoding --new-tokens 32768 \
        --cuda-graph --window 1024 --out "$R/decoding_bounded_memory_graph_$CARD.json"
    step 250 bounded_none python3 benchmarks/decoding_bounded_memory.py --variant none --new-tokens 32768 \
        --cuda-graph --window 1024 --out "$R/decoding_bounded_memory_none_$CARD.json"
    ;;
*)
    echo "usage: bash benchmarks/gpu_suite.sh 1|2|3" >&2
    exit 2
    ;;
esac
