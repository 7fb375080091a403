#!/usr/bin/env bash
# Block retrieval on SmolLM2-135M, the README's "Block retrieval" table (issue 38). Resumable: each cell is a file;
# a rerun skips the cells that exist. Usage: benchmarks/smollm2_blocks.sh [float32|bfloat16] [results dir]
# (float32 on CPUs without native bfloat16 matmul, e.g. AVX2-only; bfloat16 where torch reports AVX512 + BF16).
set -euo pipefail
DTYPE=${1:-float32}
OUT=${2:-benchmarks/results/smollm2_blocks}
WAP=${WAP:-../shared/data/war_and_peace.txt}
MODES=benchmarks/modes/smollm2_blocks.yaml
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# one YAML per subset of modes (memlm eval runs every mode it is given at every length)
subset() { .venv/bin/python - "$MODES" "$TMP/$1.yaml" "${@:2}" <<'PY'
import sys, yaml
modes = yaml.safe_load(open(sys.argv[1]))
yaml.safe_dump({name: modes[name] for name in sys.argv[3:]}, open(sys.argv[2], "w"))
PY
}
subset full full; subset blocks blocks; subset both blocks blocks-representatives; subset xl xl-only
subset b32 blocks-32
run() { .venv/bin/memlm eval --model smollm2 --dtype "$DTYPE" --depths random "$@"; }
# 1. pass key in filler: the model's own attention at 4K, blocks at 16K / 32K
run --task passkey --lengths 4096 --trials 5 --modes "$TMP/full.yaml" --output "$OUT/filler"
run --task passkey --lengths 16384 --trials 8 --modes "$TMP/blocks.yaml" --output "$OUT/filler"
run --task passkey --lengths 32768 --trials 4 --modes "$TMP/blocks.yaml" --output "$OUT/filler"
# 2. speed: the XL-only stream of the same local context, one 32K haystack
run --task passkey --lengths 32768 --trials 1 --modes "$TMP/xl.yaml" --output "$OUT/filler"
# 3. pass key in War and Peace with 4 distractor numbers; RULER multikey (numbers)
run --task passkey --distractors 4 --haystack "$WAP" --lengths 4096 --trials 3 --modes "$TMP/full.yaml" \
    --output "$OUT/war_and_peace_distractors"
run --task passkey --distractors 4 --haystack "$WAP" --lengths 16384 --trials 3 --modes "$TMP/blocks.yaml" \
    --output "$OUT/war_and_peace_distractors"
run --task niah_multikey --lengths 4096 --trials 3 --modes "$TMP/full.yaml" --output "$OUT/filler"
run --task niah_multikey --lengths 16384 --trials 3 --modes "$TMP/blocks.yaml" --output "$OUT/filler"
# 4. the longest: 64K
run --task passkey --lengths 65536 --trials 1 --modes "$TMP/blocks.yaml" --output "$OUT/filler"
# 5. UUID values, where block representatives are known to fail: both scoring rules
run --task niah_multikey_uuids --lengths 4096 --trials 3 --modes "$TMP/full.yaml" --output "$OUT/filler"
run --task niah_multikey_uuids --lengths 16384 --trials 2 --modes "$TMP/both.yaml" --output "$OUT/filler"
# 6. smaller blocks (16 x 32 tokens) where 128-token blocks missed: War and Peace with distractors
run --task passkey --distractors 4 --haystack "$WAP" --lengths 16384 --trials 2 --modes "$TMP/b32.yaml" \
    --output "$OUT/war_and_peace_distractors"
