#!/usr/bin/env bash
# One prepared GPU check (issue 20), under 8 minutes on one GPU. Run from the repository root in
# an environment with the project installed (pip install -c constraints.txt -e '.[dev]'):
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default: outputs/gpu_check
#
# 1. the gpu-marked tests (CUDA autocast of every variant, the compiled Triton curvature kernels
#    at the paper's 768 <-> 3072 FFN shapes, the merge fused into the token GEMM);
# 2. the layer benchmark, fp32 and bf16 autocast (dense, euclid, camex r=1/r=8, released r=1/r=8),
#    and the fused kernels against the PyTorch paths they replace (scripts/gpu_kernels.py: the
#    curvature at 3072x768 and 768x3072, r=1/r=8; the merged linear with and without the merge
#    fused into the token GEMM, fp32 and bf16, training step and evaluation);
# 3. the model benchmark at base size, fp32 and bf16 autocast (dense, domain, camex r=1 and r=8);
# 4. one short real training run per family (BERT, T5, GPT-2, ViT) in bf16 through run.py, and
#    one with trainer.compile=true;
# then `scripts/gpu_check_summary.py` writes OUT_DIR/gpu_check.json (every figure, the commit and
# the device) and prints the markdown table for docs/gpu_path.md. Each step has its own time
# limit; a step that fails or times out is recorded as such and the rest still run.
set -u
OUT=${1:-outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
: > "$OUT/steps.tsv"

# every step's limit is cut to what is left of the whole check's 470 s (under 8 minutes)
DEADLINE=$((SECONDS + 470))

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, record status and time
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "[$name] skipped: the check's time is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
  echo "[$name] exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1

step tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  tests/test_precision.py tests/test_triton_kernels.py tests/test_triton_merged_gemm.py

LAYER_CASES="dense euclid camex_r1 camex_r8 released_r1 released_r8"
step layer_fp32 45 "$PY" -m benchmarks.layer --device cuda --cases $LAYER_CASES --repeats 5 \
  --out "$OUT/layer_fp32.json"
step layer_bf16 45 "$PY" -m benchmarks.layer --device cuda --cases $LAYER_CASES --repeats 5 \
  --dtype bfloat16 --autocast --out "$OUT/layer_bf16.json"
step kernels 75 "$PY" scripts/gpu_kernels.py --device cuda --repeats 5 --out "$OUT/kernels.json"

for dtype in float32 bfloat16; do
  step "model_${dtype}" 60 "$PY" -m benchmarks.model --device cuda --base --models t5 gpt2 \
    --variants dense domain camex --dtype "$dtype" --repeats 3 --out "$OUT/model_${dtype}.json"
done
step model_bfloat16_r8 40 "$PY" -m benchmarks.model --device cuda --base --models t5 gpt2 \
  --variants camex --rank 8 --dtype bfloat16 --repeats 3 --out "$OUT/model_bfloat16_r8.json"

RUN="trainer=tiny trainer.max_steps=30 trainer.max_eval_samples=256 tracking=none merge=camex overwrite=true"
for pair in bert:tiny_bert:offline/sentiment t5:tiny_t5:offline/sentiment gpt2:tiny_gpt2:offline/wiki_lm \
            vit:tiny_vit:offline/digits; do
  IFS=: read -r family model task <<< "$pair"
  step "train_${family}" 40 "$PY" run.py task="$task" model="$model" $RUN trainer.precision=bf16 \
    paths.output_root="$OUT/runs"
done
step train_bert_compile 80 "$PY" run.py task=offline/sentiment model=tiny_bert $RUN trainer.precision=bf16 \
  trainer.compile=true paths.output_root="$OUT/runs_compile"

"$PY" scripts/gpu_check_summary.py "$OUT"
