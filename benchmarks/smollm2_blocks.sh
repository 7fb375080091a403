#!/usr/bin/env bash
# Block retrieval on SmolLM2-135M, the README's "Block retrieval" tables (issue 38). Resumable: each cell is a file
# rewritten after every trial; a rerun answers only the trials a cell lacks. Usage: benchmarks/smollm2_blocks.sh [float32|bfloat16] [results dir]
# (float32 on CPUs without native bfloat16 matmul, e.g. AVX2-only; bfloat16 where torch reports AVX512 + BF16).
# The order is the priority order: the baselines, then the targets at 16K, 32K and 64K. One haystack per session
# (no --batch): on the 2-core AVX2 EPYC two 32K haystacks as the rows of one session took 349 s per haystack, alone,
# against 140-240 s one by one beside another process (one exploratory measurement).
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
subset full full; subset blocks blocks; subset blocks2 blocks-2; subset blocks8 blocks-8; subset blocks4 blocks-4
subset xl xl-only
subset pertoken blocks-per-token; subset fullpertoken full blocks-per-token
subset perlayer blocks-per-layer
run() { .venv/bin/memlm eval --model smollm2 --dtype "$DTYPE" --depths random "$@"; }
distractors() { run --task passkey --distractors 4 --haystack "$WAP" --output "$OUT/war_and_peace_distractors" "$@"; }
multikey() { run --task niah_multikey --output "$OUT/filler" "$@"; }
filler() { run --task passkey --output "$OUT/filler" "$@"; }
# Cells grow: a rerun with more --trials answers only the trials a cell's file lacks.
# 1. the baselines: the model's own attention at 4K on each kind of haystack
distractors --lengths 4096 --trials 20 --modes "$TMP/full.yaml"
multikey --lengths 4096 --trials 20 --modes "$TMP/full.yaml"
run --task niah_multikey_uuids --lengths 4096 --trials 5 --modes "$TMP/full.yaml" --output "$OUT/filler"
# 2. 16K: the model's default memory on each kind of haystack
multikey --lengths 16384 --trials 20 --modes "$TMP/blocks.yaml"
filler --lengths 16384 --trials 20 --modes "$TMP/blocks.yaml"
distractors --lengths 16384 --trials 10 --modes "$TMP/blocks.yaml"
# 3. 32K and 64K, a few trials of each cell first, then the filler target's 10, then the rest; the XL-only stream
# of the same local context at 32K (speed)
distractors --lengths 32768 --trials 5 --modes "$TMP/blocks.yaml"
multikey --lengths 32768 --trials 5 --modes "$TMP/blocks.yaml"
filler --lengths 32768 --trials 5 --modes "$TMP/blocks.yaml"
filler --lengths 65536 --trials 5 --modes "$TMP/blocks.yaml"
distractors --lengths 65536 --trials 3 --modes "$TMP/blocks.yaml"
multikey --lengths 65536 --trials 3 --modes "$TMP/blocks.yaml"
filler --lengths 32768 --trials 1 --modes "$TMP/xl.yaml"
filler --lengths 32768 --trials 10 --modes "$TMP/blocks.yaml"
filler --lengths 65536 --trials 10 --modes "$TMP/blocks.yaml"
distractors --lengths 32768 --trials 10 --modes "$TMP/blocks.yaml"
multikey --lengths 32768 --trials 10 --modes "$TMP/blocks.yaml"
distractors --lengths 65536 --trials 10 --modes "$TMP/blocks.yaml"
multikey --lengths 65536 --trials 10 --modes "$TMP/blocks.yaml"
# 5. the same haystacks with 2 blocks and no neighbours, 8 blocks (the default before), 4 blocks, and each generated
# token selecting for itself (before hold_blocks); per-token multikey at 4K on full attention's haystacks; War and
# Peace at 8K beside the model's own attention over its whole window
multikey --lengths 16384 --trials 20 --modes "$TMP/blocks2.yaml"
filler --lengths 16384 --trials 20 --modes "$TMP/blocks2.yaml"
distractors --lengths 16384 --trials 10 --modes "$TMP/blocks2.yaml"
distractors --lengths 16384 --trials 10 --modes "$TMP/blocks8.yaml"
multikey --lengths 16384 --trials 10 --modes "$TMP/blocks8.yaml"
distractors --lengths 32768 --trials 5 --modes "$TMP/blocks8.yaml"
filler --lengths 16384 --trials 5 --modes "$TMP/blocks8.yaml"
distractors --lengths 16384 --trials 20 --modes "$TMP/pertoken.yaml"
multikey --lengths 16384 --trials 20 --modes "$TMP/pertoken.yaml"
filler --lengths 16384 --trials 20 --modes "$TMP/pertoken.yaml"
filler --lengths 32768 --trials 10 --modes "$TMP/pertoken.yaml"
multikey --lengths 4096 --trials 10 --modes "$TMP/pertoken.yaml"
distractors --lengths 8192 --trials 8 --modes "$TMP/fullpertoken.yaml"
distractors --lengths 16384 --trials 20 --modes "$TMP/blocks.yaml"
# 6. UUID values at 16K; 4 blocks
run --task niah_multikey_uuids --lengths 16384 --trials 3 --modes "$TMP/blocks.yaml" --output "$OUT/filler"
distractors --lengths 16384 --trials 10 --modes "$TMP/blocks4.yaml"
multikey --lengths 16384 --trials 10 --modes "$TMP/blocks4.yaml"
# 7. each layer and head selecting for itself (the default before the pooled selection), on the targets' cells
multikey --lengths 16384 --trials 10 --modes "$TMP/perlayer.yaml"
filler --lengths 16384 --trials 20 --modes "$TMP/perlayer.yaml"
distractors --lengths 16384 --trials 10 --modes "$TMP/perlayer.yaml"
distractors --lengths 32768 --trials 5 --modes "$TMP/perlayer.yaml"
multikey --lengths 32768 --trials 5 --modes "$TMP/perlayer.yaml"
filler --lengths 32768 --trials 6 --modes "$TMP/perlayer.yaml"
filler --lengths 65536 --trials 5 --modes "$TMP/perlayer.yaml"
distractors --lengths 65536 --trials 3 --modes "$TMP/perlayer.yaml"
multikey --lengths 65536 --trials 3 --modes "$TMP/perlayer.yaml"
