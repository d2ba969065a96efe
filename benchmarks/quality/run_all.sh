#!/usr/bin/env bash
# Regenerates every quality table in priority order. Each step records its rows as it goes and
# re-scores from the embedding cache, so the script can be interrupted and re-run at no loss.
# Usage: benchmarks/quality/run_all.sh [FIRST_STEP]   (logs under benchmarks/results/quality/logs)
set -u
cd "$(dirname "$0")"
PY=../../.venv/bin/python
LOGS=../results/quality/logs
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
steps=(
  "methods_gemma:methods.py refs gemma3-270m:vanilla,htp,htp-adaptive,tp,prompteol"
  "sweep_gemma_a:sweep.py gemma3-270m k1-r1-3 k1-r1-7 local-r1-3 global-r1-3 k1-r1-2"
  "methods_smollm:methods.py smollm2-135m:vanilla,htp"
  "replicate_gemma:replicate.py gemma3-270m k1-r1-7 k1-r1-3"
  "long_docs_a:long_docs.py vanilla k=1 adaptive:8 k=4"
  "sweep_smollm:sweep.py smollm2-135m"
  "postprocess_smollm:postprocess.py smollm2-135m"
  "replicate_smollm:replicate.py smollm2-135m sink-vanilla sink-k1-r1-7 k1-r1-7"
  "sweep_gemma_b:sweep.py gemma3-270m k1-r4-8 k1-r8-12 k4-r1-3 k1-r0-3"
  "fusion:fusion.py"
  "postprocess:postprocess.py"
  "postprocess_replicate:postprocess.py gemma3-270m replicate"
  "diagnostics:diagnostics.py gemma3-270m 13"
  "long_docs_b:long_docs.py k=12 adaptive:16"
  "methods_echo:methods.py gemma3-270m:echo"
  "sweep_gemma_c:sweep.py gemma3-270m k1-r2-5 k1-r1-4 k2-r1-3 k1-r1-3-sentencizer k1-r12-13"
  "long_docs_c:long_docs.py k=2 k=8 adaptive:4"
)
started=${1:-}
for step in "${steps[@]}"; do
  name=${step%%:*}; command=${step#*:}
  if [[ -n $started && $name != "$started" ]]; then continue; fi
  started=""
  echo "$(date +%T) start $name: $command"
  # shellcheck disable=SC2086
  nice -n 5 $PY $command >"$LOGS/$name.log" 2>&1 || echo "$(date +%T) $name failed (see $LOGS/$name.log)"
  $PY report.py >/dev/null 2>&1 || true
done
echo "$(date +%T) all steps done"
