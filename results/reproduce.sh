#!/usr/bin/env bash
# The commands behind the README's GPU numbers. Each step tees its log to OUT/<step>.log, copies the run's
# metrics.jsonl and config.json to OUT/<step>-*.json* (never a checkpoint: those stay in WORK), runs under a time limit
# (SIGTERM: the scripts save last.pt and exit 143) and adds a line to OUT/times.tsv: name, exit code, wall seconds.
#
#   bash results/reproduce.sh DATA OUT     # DATA: cifar10 (downloads) or an ImageFolder root such as cifar10-jpeg
#
# The GPU plan of issue 18, one device call each (under 10 minutes on an H100), in order of value:
#   1. STEPS="empssl linear"                      EMP-SSL with today's defaults, then its linear probe
#   2. STEPS="reference reference-linear" REFERENCE=path/to/emp-ssl
#                                                 the reference's own EMP-SSL trainer on the same data and GPU
#                                                 (results/reference_empssl.py), evaluated by our bag of features
#                                                 and linear probe
#   3. STEPS=ablation                             EMP-SSL: seeds 43 and 44, fp16, fp32, one more JPEG generation
#   4. STEPS="mmcr finetune"                      MMCR, 12 epochs (kNN every 4), then its linear probe
#   5. STEPS="bench compile"                      bench.py, eager and compiled
#
# Variables (all optional):
#   STEPS="empssl linear mmcr finetune bench compile"   the steps to run, in this order (a subset: only those); also
#                    reference, reference-linear and ablation (not in the default)
#   ABLATIONS="seed43 seed44 fp16 fp32 jpeg"   EMP-SSL runs of the default recipe with one change each: seedN (--seed N),
#                    fp16 / fp32 (--precision), unscaled (--unscaled-inputs), kernel3 (--blur kernel3), jpeg (the data
#                    re-encoded once more as JPEG with a shifted block grid, by results/reencode_jpeg.py)
#   REFERENCE=dir    a checkout of bartoszzuk/emp-ssl, for the reference steps (needs lightning and torchmetrics)
#   MMCR_EPOCHS=12 MMCR_EVAL_EVERY=4   the MMCR schedule and its kNN interval
#   NORMALIZE=cifar10   mmcr_pretrain.py --normalize: the reference's CIFAR-10 constants also for an ImageFolder copy
#   LIMIT_<STEP>=seconds   a step's time limit (defaults below; ablations: LIMIT_ABLATION each)
#   WORK=dir         where the runs and the decoded-data cache go (default: a new temporary folder)
#   SMALL=1          shrink every run to a CPU smoke test of this script (the numbers mean nothing)
set -uo pipefail
[ $# -eq 2 ] || { echo "usage: bash results/reproduce.sh DATA OUT" >&2; exit 2; }
data=$1 out=$2
cd "$(dirname "$0")/.."
mkdir -p "$out" || exit 2
work=${WORK:-$(mktemp -d)}
steps=${STEPS:-empssl linear mmcr finetune bench compile}
export PYTHONUNBUFFERED=1
failed=0

if [ "${SMALL:-0}" = 1 ]; then
  bench=(--device cpu --steps 2 --warmup 1 --train-steps 2 --aug-views 64 --loader-workers 2 --loader-batches 2)
  empssl=(--limit-train 64 --limit-test 32 --batch-size 8 --train-patches 2 --valid-patches 2 --log-every 2)
  reference=(--limit-train 64 --limit-test 32 --batch-size 8 --train-patches 2 --valid-patches 2)
  linear=(--max-epochs 2 --batch-size 16)
  mmcr=(--limit-train 64 --limit-test 32 --batch-size 8 --num-views 2 --log-every 2)
  finetune=(--max-epochs 1 --limit-train 64 --limit-test 32 --batch-size 16)
  compile=(--device cpu --steps 1 --warmup 1 --train-steps 1)
  jpeg_workers=2
else
  bench=(--device cuda) empssl=() reference=() linear=() mmcr=() finetune=() compile=(--device cuda)
  jpeg_workers=$(nproc)
fi

# step NAME LIMIT COMMAND...: run it with its log tee'd to OUT/NAME.log, stopped by SIGTERM after LIMIT seconds.
# --foreground keeps the command in our process group, so a timeout around this whole script reaches it too.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee "$out/$name.log"
  timeout --foreground -s TERM "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$out/times.tsv"
  return "$rc"
}

# keep RUN's small files: OUT/RUN-metrics.jsonl, OUT/RUN-metrics.json and OUT/RUN-config.json
keep() {
  for f in metrics.jsonl metrics.json config.json; do
    [ -f "$work/$1/$f" ] && cp "$work/$1/$f" "$out/$1-$f"
  done
}

wants() { [[ " $steps " == *" $1 "* ]]; }

python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$out/versions.txt"
command -v nvidia-smi >/dev/null &&
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/versions.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/versions.txt"

if wants empssl; then
  step empssl "${LIMIT_EMPSSL:-240}" python empssl_pretrain.py --dataset "$data" --data-dir "$work/data" \
    --output-dir "$work/empssl" "${empssl[@]}" || failed=1
  keep empssl
fi
if wants linear; then
  step linear "${LIMIT_LINEAR:-150}" python empssl_linear.py --dataset "$work/empssl/embeddings" \
    --output-dir "$work/linear" "${linear[@]}" || failed=1
  keep linear
fi
if wants reference; then
  if [ -z "${REFERENCE:-}" ]; then
    echo "reference: set REFERENCE to a checkout of bartoszzuk/emp-ssl" >&2
    failed=1
  else
    step reference "${LIMIT_REFERENCE:-450}" python results/reference_empssl.py --reference "$REFERENCE" \
      --dataset "$data" --data-dir "$work/data" --output-dir "$work/reference" "${reference[@]}" || failed=1
    keep reference
  fi
fi
if wants reference-linear; then
  step reference-linear "${LIMIT_LINEAR:-150}" python empssl_linear.py --dataset "$work/reference/embeddings" \
    --output-dir "$work/reference-linear" "${linear[@]}" || failed=1
  keep reference-linear
fi
if wants ablation; then
  for a in ${ABLATIONS:-seed43 seed44 fp16 fp32 jpeg}; do
    dataset=$data change=()
    case $a in
      seed[0-9]*) change=(--seed "${a#seed}") ;;
      fp16 | fp32) change=(--precision "$a") ;;
      unscaled) change=(--unscaled-inputs) ;;
      kernel3) change=(--blur kernel3) ;;
      jpeg)
        dataset=$work/jpeg-shift4
        if [ ! -d "$dataset" ]; then
          step reencode "${LIMIT_REENCODE:-300}" python results/reencode_jpeg.py "$data" "$dataset" --shift 4 \
            --workers "$jpeg_workers" || { failed=1; continue; }
          cp "$dataset/reencode.json" "$out/reencode.json"
        fi ;;
      *) echo "unknown ablation: $a (seedN, fp16, fp32, unscaled, kernel3, jpeg)" >&2; failed=1; continue ;;
    esac
    step "empssl-$a" "${LIMIT_ABLATION:-200}" python empssl_pretrain.py --dataset "$dataset" --data-dir "$work/data" \
      --output-dir "$work/empssl-$a" "${empssl[@]}" "${change[@]}" || failed=1
    keep "empssl-$a"
    # each run writes about 0.6 GB of embeddings and checkpoints that nothing reads
    rm -rf "${work:?}/empssl-$a"
  done
fi
if wants mmcr; then
  step mmcr "${LIMIT_MMCR:-420}" python mmcr_pretrain.py --dataset "$data" --data-dir "$work/data" \
    --output-dir "$work/mmcr" --normalize "${NORMALIZE:-cifar10}" --max-epochs "${MMCR_EPOCHS:-12}" \
    --eval-every "${MMCR_EVAL_EVERY:-4}" "${mmcr[@]}" || failed=1
  keep mmcr
fi
if wants finetune; then
  step finetune "${LIMIT_FINETUNE:-150}" python mmcr_finetune.py --checkpoint "$work/mmcr/last.pt" \
    --data-dir "$work/data" --output-dir "$work/finetune" "${finetune[@]}" || failed=1
  keep finetune
fi
if wants bench; then
  step bench "${LIMIT_BENCH:-300}" python bench.py "${bench[@]}" || failed=1
fi
if wants compile; then
  step compile "${LIMIT_COMPILE:-300}" python bench.py --compile --only mmcr_step "${compile[@]}" || failed=1
fi
echo "results in $out, runs and checkpoints in $work"
exit $failed
