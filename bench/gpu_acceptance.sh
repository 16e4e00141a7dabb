#!/usr/bin/env bash
# GPU acceptance (issue #23): every figure in one call, written under $OUT.
#
#   bash bench/gpu_acceptance.sh            # on a lent GPU machine, in the repo root, with .whl/ carried
#   bash bench/gpu_acceptance.sh --smoke    # the same steps on this CPU: vlcl-tiny, a few steps, fp32
#
# Steps, each under its own time limit (`timeout`), so one slow step cannot eat the others, and all
# of them under one deadline (about 7.5 minutes on the GPU):
#   setup          unpack .whl/site.tar.xz (made by ../shared/device/pack-wheels.sh with
#                  EXTRA_WHEELS=torchcodec==0.17.0) into /tmp/site; skipped with --smoke (current env)
#   environment    GPU, driver and package versions -> $OUT/environment.txt
#   throughput     bench/throughput.py for ViT-B-32 at batch 512 and ViT-B-16 at batch 256, bf16,
#                  from scratch (no weights offline), data.decode cpu and device: plain and vlcl-run
#                  img/s, their ratio, MFU against 989 TF/s, peak GPU memory -> $OUT/throughput-<model>.json
#   method_cost    bench/method_cost.py for finetune, zscl, ctp, modx, lwf, er: time and FLOP ratio to
#                  fine-tuning, peak memory -> $OUT/method_cost.json
#   summary        bench/gpu_acceptance_summary.py -> $OUT/summary.md and $OUT/summary.json
# Every step's output goes to $OUT/log.txt (and stdout). The benches rewrite their JSON after each
# measurement, so a step stopped at its limit keeps what it measured. OUT unset: a new temp folder.
# Exit status 0 when every expected figure is there, else 1 (summary.md's "Missing" says which).
# At most 7 files land in $OUT (the device tool returns 8).
set -uo pipefail

mode=gpu
case "${1:-}" in
  --smoke) mode=smoke ;;
  "") ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: bash bench/gpu_acceptance.sh [--smoke]" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
started=$(date +%s)
if [[ -z "${OUT:-}" ]]; then
  OUT=$(mktemp -d -t vlcl-gpu-acceptance-XXXXXX)
  echo "OUT is unset: writing to $OUT"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d -t vlcl-acceptance-work-XXXXXX)   # shards, runs, MLflow store: never under $OUT
trap 'rm -rf "$work"' EXIT
log=$OUT/log.txt
steps=$work/steps.tsv
: > "$log"
: > "$steps"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
methods=(finetune zscl ctp modx lwf er)
decodes=(cpu device)

if [[ $mode == smoke ]]; then
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  deadline=$((started + ${ACCEPTANCE_SECONDS:-600}))
  device=cpu precision=fp32 warmup=1 decoders=(--decoders 1)
  configs=("vlcl-tiny 16 3")                     # model batch steps
  cost=(--model vlcl-tiny --batch 4 --steps 1 --warmup 0 --reference-samples 16)
  limits=(environment=60 throughput=300 method_cost=240)
else
  export PYTHONPATH="/tmp/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
  deadline=$((started + ${ACCEPTANCE_SECONDS:-450}))
  device=cuda precision=bf16 warmup=5 decoders=()
  configs=("ViT-B-32 512 150" "ViT-B-16 256 100")
  cost=(--model ViT-B-32 --batch 512 --steps 10 --warmup 3)
  limits=(setup=45 environment=30 throughput=140 method_cost=95)
fi

limit_of() {  # the time limit named in $limits for a step kind
  local entry
  for entry in "${limits[@]}"; do [[ ${entry%%=*} == "$1" ]] && { echo "${entry#*=}"; return; }; done
  echo 60
}

run_step() {  # run_step NAME LIMIT_SECONDS COMMAND...: runs it under min(limit, time to the deadline)
  local name=$1 limit=$2 left rc status begun seconds
  shift 2
  left=$((deadline - $(date +%s)))
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then
    echo "== $name: skipped, ${left}s left before the deadline" | tee -a "$log"
    printf '%s\tskipped\t0\t0\t%s\n' "$name" "$limit" >> "$steps"
    return 1
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  begun=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  seconds=$(($(date +%s) - begun))
  case $rc in
    0) status=ok ;;
    124|137) status=timed_out ;;
    *) status=failed ;;
  esac
  echo "== $name: $status (exit $rc) after ${seconds}s" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" >> "$steps"
  if [[ $status == timed_out && $mode == gpu ]]; then
    # a driver killed at its limit can leave its local Ray cluster holding GPU memory; everything on the
    # lent machine was started by this script (never done with --smoke: this machine is shared)
    timeout 15 "$PYTHON" -m ray.scripts.scripts stop --force >> "$log" 2>&1
  fi
  return "$rc"
}

environment() {  # what the figures were measured with -> $OUT/environment.txt (and the log)
  write_environment > "$OUT/environment.txt" 2>&1
  local rc=$?
  cat "$OUT/environment.txt"
  return "$rc"
}

write_environment() {
  echo "date: $(date -u +%FT%TZ)"
  echo "mode: $mode"
  echo "commit: $(git -C "$repo" rev-parse HEAD 2>/dev/null || echo 'unknown (no .git in this copy)')"
  echo "cpus: $(nproc)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  "$PYTHON" - <<'PY'
import importlib.metadata as metadata
import sys

print("python:", sys.version.split()[0], sys.executable)
for name in ("torch", "torchcodec", "torchvision", "open_clip_torch", "ray", "mlflow-skinny", "mlflow",
             "pydantic", "webdataset", "numpy", "scikit-learn"):
    try:
        print(f"{name}: {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
import torch

print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs")
import open_clip, ray, mlflow, pydantic, webdataset, torchcodec.decoders  # noqa: E401,F401  every one the benches need
print("imports: ok")
PY
}

echo "vlcl GPU acceptance, mode $mode, writing to $OUT" | tee -a "$log"
unpack_wheels() {  # the packages the GPU image lacks, as ../shared/device/pack-wheels.sh packs them
  mkdir -p /tmp/site
  if [[ -f .whl/site.tar.xz ]]; then
    tar -xJf .whl/site.tar.xz -C /tmp/site && echo "unpacked .whl/site.tar.xz into /tmp/site"
  elif compgen -G '.whl/*.whl' > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl/site.tar.xz: run  EXTRA_WHEELS=torchcodec==0.17.0 bash ../shared/device/pack-wheels.sh" \
         " in the repo root and carry .whl" >&2
    return 1
  fi
}
export -f environment write_environment unpack_wheels
export mode repo OUT PYTHON

if [[ $mode == gpu ]]; then
  run_step setup "$(limit_of setup)" bash -c unpack_wheels
fi
run_step environment "$(limit_of environment)" bash -c environment

throughput_files=()
for config in "${configs[@]}"; do
  read -r model batch steps_count <<< "$config"
  file=throughput-$model.json
  throughput_files+=("$file")
  run_step "throughput $model batch $batch" "$(limit_of throughput)" \
    "$PYTHON" bench/throughput.py --model "$model" --batch "$batch" --steps "$steps_count" --warmup "$warmup" \
    --device "$device" --precision "$precision" --decode "${decodes[@]}" "${decoders[@]}" \
    --workdir "$work/throughput-$model" --json "$OUT/$file"
  rm -rf "$work/throughput-$model"
done

run_step method_cost "$(limit_of method_cost)" \
  "$PYTHON" bench/method_cost.py "${cost[@]}" --device "$device" --precision "$precision" \
  --methods "${methods[@]}" --json "$OUT/method_cost.json"

rm -f "$OUT"/*.partial
"$PYTHON" bench/gpu_acceptance_summary.py --out "$OUT" --steps "$steps" --mode "$mode" \
  --seconds "$(($(date +%s) - started))" --throughput "${throughput_files[@]}" --decode "${decodes[@]}" \
  --method-cost method_cost.json --methods "${methods[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
if [[ ! -s $OUT/summary.md ]]; then   # the summary itself broke: keep at least the steps' statuses
  { echo "# GPU acceptance ($mode): the summary step failed (exit $rc), see log.txt"; echo; cat "$steps"; } > "$OUT/summary.md"
fi
echo "== done in $(($(date +%s) - started))s: $OUT" | tee -a "$log"
exit "$rc"
