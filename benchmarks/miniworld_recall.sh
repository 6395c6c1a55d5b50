#!/usr/bin/env bash
# Issue 13's table: does a GTMM world model remember the 3D places it saw, from its actions and frames alone?
# Four models on the same held-out MiniWorld worlds (new layout and textures every episode), each evaluated on
# open-loop prediction of revisits of places seen in the context, against `none`:
#
#   none        no memory (the baseline)
#   gated       introspective memory, SE(2) integrator over the declared moves + the blocked-move gate (the default,
#               what --address auto picks for MiniWorld data)
#   naive       the same integrator assuming every move happens (--address-kwargs '{"gate": false}')
#   pose        the env's pose as the address (an oracle ceiling)
#   learned     the SE(2) integrator with learned moves (--address-kwargs '{"moves": null}') + the gate  (gpu only)
#
#   bash benchmarks/miniworld_recall.sh cpu      this machine (2 cores): 32x32 frames, miniworld_cpu preset, 2000
#                                                steps, two runs at a time (~1-1.5 h in all when the cores are free)
#   bash benchmarks/miniworld_recall.sh pack     run HERE before the GPU run: collects 64x64 train/test rollouts
#                                                into build/miniworld_recall/data64 (a GPU machine has no OpenGL):
#                                                80 + 24 episodes of 96 steps, ~50 MB (the device's carry limit is 64)
#   bash benchmarks/miniworld_recall.sh gpu      on the GPU machine (carry build/miniworld_recall and, for the
#                                                packages it lacks, build/gpu_check/pydeps from gpu_check.sh --pack):
#                                                the `miniworld` preset, all five runs at once on one GPU, each with a
#                                                7-minute limit (STEPS, default 3000), then evaluation; < 10 minutes.
#                                                PRESET, STEPS, DEVICE, LIMIT (seconds per run), DATA (a folder
#                                                with train/ and test/ rollouts), WINDOWS (test windows) override;
#                                                TRAIN_FLAGS adds flags to every run (e.g. "--compile off");
#                                                a CPU dry run of the whole path:
#                                                DEVICE=cpu PRESET=debug STEPS=3 EVAL_SEQ_LEN=32 \
#                                                  bash benchmarks/miniworld_recall.sh gpu
#
# Everything lands in $OUT (default build/miniworld_recall/<mode>): runs, eval.json files, results.md (the table).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
MODE="${1:-}"
PACK="$ROOT/build/miniworld_recall"
[ -d "$ROOT/build/gpu_check/pydeps" ] && export PYTHONPATH="$ROOT/build/gpu_check/pydeps${PYTHONPATH:+:$PYTHONPATH}"

collect() {  # collect <folder> <episodes> <seed> <obs_size>
  "$PY" -m rollouts.collect --env miniworld --agent loop --agent-kwargs '{"max_out": 12}' --episodes "$2" \
    --episode-steps 96 --seed "$3" --env-kwargs "{\"obs_size\": $4}" --out "$1" --no-progress || exit 1
}

run() {  # run <name> <extra train flags...>: train, then evaluate against the none run
  local name="$1"; shift
  ${LIMIT:+timeout -s TERM "$LIMIT"} "$PY" -m worldmodel.train --data "$DATA/train" --preset "$PRESET" --steps "$STEPS" --out "$OUT/$name" \
    --no-progress --device "$DEVICE" ${TRAIN_FLAGS:-} "$@" > "$OUT/$name.log" 2>&1
}

evaluate() {  # evaluate <name>
  "$PY" -m worldmodel.evaluate --checkpoint "$OUT/$1" --data "$DATA/test" --baseline "$OUT/none" \
    --device "$DEVICE" --windows "$WINDOWS" ${EVAL_SEQ_LEN:+--seq-len "$EVAL_SEQ_LEN"} > "$OUT/$1.eval.log" 2>&1 || echo "evaluate $1 failed: see $OUT/$1.eval.log"
}

case "$MODE" in
  pack)
    rm -rf "$PACK/data64"
    collect "$PACK/data64/train" 80 0 64
    collect "$PACK/data64/test" 24 777 64
    du -sh "$PACK/data64"
    echo "carry build/miniworld_recall (and build/gpu_check) to the GPU machine and run: bash benchmarks/miniworld_recall.sh gpu"
    exit 0 ;;
  cpu)
    OUT="${OUT:-$PACK/cpu}"; DATA="$OUT/data"; PRESET=miniworld_cpu; STEPS="${STEPS:-2000}"; DEVICE=cpu; LIMIT=
    WINDOWS=256
    mkdir -p "$OUT"
    [ -f "$DATA/train/manifest.json" ] || collect "$DATA/train" 400 0 32
    [ -f "$DATA/test/manifest.json" ] || collect "$DATA/test" 100 777 32
    run none --memory none & run gated & wait
    run naive --address-kwargs '{"gate": false}' & run pose --address pose & wait
    NAMES="none gated naive pose" ;;
  gpu)
    OUT="${OUT:-$PACK/gpu}"; DATA="${DATA:-$PACK/data64}"; PRESET="${PRESET:-miniworld}"; STEPS="${STEPS:-3000}"
    DEVICE="${DEVICE:-cuda}"; WINDOWS="${WINDOWS:-24}"
    [ -f "$DATA/train/manifest.json" ] || { echo "error: no $DATA: run 'bash benchmarks/miniworld_recall.sh pack' on a machine with OpenGL first" >&2; exit 2; }
    mkdir -p "$OUT"
    # each run stops by LIMIT seconds (default 7 minutes): SIGTERM makes train save its step and exit; that checkpoint
    # is evaluated
    LIMIT="${LIMIT:-420}"
    run none --memory none & run gated & run naive --address-kwargs '{"gate": false}' &
    run pose --address pose & run learned --address-kwargs '{"moves": null}' & wait
    NAMES="none gated naive pose learned" ;;
  *)
    echo "usage: bash benchmarks/miniworld_recall.sh cpu | pack | gpu" >&2; exit 2 ;;
esac

for name in $NAMES; do [ "$name" = none ] || evaluate "$name" & done; wait  # one process each: a GPU has room
"$PY" -m worldmodel.report $(for name in $NAMES; do [ "$name" = none ] || echo "$OUT/$name"; done) --out "$OUT/report"
cat "$OUT/report/results.md"
