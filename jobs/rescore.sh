#!/usr/bin/env bash
# rescore.sh: score every image again with a new model into the dataset, then diff the models.
#
# Rows of the new model are added under its SHA-256 beside the old ones; nothing is overwritten.
# Images the new model already scored are skipped, so after a kill the same command resumes.
# Then `batchscore diff` compares the previous model with the new one on the same images and
# prints the report (how many changed top-1, the label flips, the probability shift); the
# changed images are written side by side to CHANGED. The exit code is batchscore's, unchanged:
#   0 done   1 unexpected failure   2 bad configuration (no previous model: set OLD_SHA)
#   3 more than MAX_CHANGED_SHARE of the compared images changed top-1 (the rescoring guard)
#   4 more than MAX_ERROR_RATE of the images failed with the new model (no diff then)
#   75 another run holds the dataset's lock   130/143 stopped by a signal (run it again)
#
# Settings: environment variables, or the flags beside them (a flag wins).
#   SOURCES            SOURCE...              what to rescore: folders, manifests (the nightly's
#                                             UPLOADS); SOURCES is split on spaces (required)
#   DATASET            --dataset DIR          the dataset directory (required)
#   NEW_MODEL          --model PATH           the new model directory or .onnx file (required)
#   OLD_SHA            --old-sha SHA          the model to compare with, a SHA-256 or a prefix
#                                             (default: the model of the newest complete run
#                                             that used another model than NEW_MODEL, read
#                                             from `batchscore runs` after the scoring)
#   MAX_CHANGED_SHARE  --max-changed-share X  exit 3 above this share (default: 0.1)
#   MAX_ERROR_RATE     --max-error-rate X     exit 4 above this share (default: 0.05; empty:
#                                             no limit)
#   CHANGED            --changed FILE         the changed images (default:
#                                             ./changed-OLD-NEW.parquet, 12-digit hashes)
#   WAIT_LOCK=1        --wait-lock            wait for a run holding the lock instead of exit 75
#   WORKERS            --workers N            worker processes (default: one per CPU)
#   BATCHSCORE         --batchscore CMD       how to run batchscore, split on spaces (default:
#                                             batchscore)
#
# Example:
#   jobs/rescore.sh --dataset /data/preds --model /models/v2 /data/uploads
#   DATASET=/data/preds NEW_MODEL=/models/v2 MAX_CHANGED_SHARE=0.02 jobs/rescore.sh /data/uploads

set -euo pipefail

read -r -a sources <<<"${SOURCES:-}"
DATASET=${DATASET:-}
NEW_MODEL=${NEW_MODEL:-}
OLD_SHA=${OLD_SHA:-}
MAX_CHANGED_SHARE=${MAX_CHANGED_SHARE:-0.1}
MAX_ERROR_RATE=${MAX_ERROR_RATE-0.05}
CHANGED=${CHANGED:-}
WAIT_LOCK=${WAIT_LOCK:-0}
WORKERS=${WORKERS:-}
BATCHSCORE=${BATCHSCORE:-batchscore}

die() {
    echo "rescore.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

positional=()
while (($#)); do
    case $1 in
        --dataset | --model | --old-sha | --max-changed-share | --max-error-rate | --changed | \
            --workers | --batchscore)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --dataset) DATASET=$2 ;;
                --model) NEW_MODEL=$2 ;;
                --old-sha) OLD_SHA=$2 ;;
                --max-changed-share) MAX_CHANGED_SHARE=$2 ;;
                --max-error-rate) MAX_ERROR_RATE=$2 ;;
                --changed) CHANGED=$2 ;;
                --workers) WORKERS=$2 ;;
                --batchscore) BATCHSCORE=$2 ;;
            esac
            shift 2
            ;;
        --wait-lock) WAIT_LOCK=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) positional+=("$1") && shift ;;
    esac
done
if ((${#positional[@]})); then sources=("${positional[@]}"); fi

((${#sources[@]})) || die "give the sources to rescore as arguments (or set SOURCES)"
[[ -n $DATASET ]] || die "set DATASET (or --dataset): the dataset directory"
[[ -n $NEW_MODEL ]] || die "set NEW_MODEL (or --model): the new model"
DATASET=${DATASET%/}
read -r -a batchscore <<<"$BATCHSCORE"

# Each step runs in the background so that a SIGTERM or SIGINT sent to this script reaches it.
run() {
    "$@" &
    local child=$!
    trap 'forwarded=TERM && kill -s TERM "$child" 2>/dev/null || true' TERM
    trap 'forwarded=INT && kill -s INT "$child" 2>/dev/null || true' INT
    while :; do
        forwarded=""
        status=0
        wait "$child" || status=$?
        if [[ -z $forwarded ]]; then break; fi # a forwarded signal cut the wait short
    done
    trap - TERM INT
    return "$status"
}

echo "rescore.sh: scoring ${sources[*]} with $NEW_MODEL into $DATASET/" >&2
run_id=$(date -u +%Y%m%dT%H%M%SZ)-rescore-$$
score=("${batchscore[@]}" score "${sources[@]}" -o "$DATASET/" --model "$NEW_MODEL"
    --run-id "$run_id")
if [[ -n $MAX_ERROR_RATE ]]; then score+=(--max-error-rate "$MAX_ERROR_RATE"); fi
if [[ -n $WORKERS ]]; then score+=(--workers "$WORKERS"); fi
if [[ $WAIT_LOCK == 1 ]]; then score+=(--wait-lock); fi
run "${score[@]}" || exit

# The new model's SHA-256 as batchscore recorded it for this run, and by default as model A
# the newest complete run of another model: read from the run summaries, oldest first.
runs=$("${batchscore[@]}" runs "$DATASET" --status complete --field run_id,model_sha256) || exit
new_sha=$(awk -F '\t' -v id="$run_id" '$1 == id { print $2 }' <<<"$runs")
[[ -n $new_sha ]] || die "run $run_id is not among the complete runs of $DATASET"
if [[ -z $OLD_SHA ]]; then
    OLD_SHA=$(awk -F '\t' -v new="$new_sha" '$2 != new { sha = $2 } END { print sha }' <<<"$runs")
    [[ -n $OLD_SHA ]] || die "no complete run of another model in $DATASET: set OLD_SHA (or --old-sha)"
fi
CHANGED=${CHANGED:-changed-${OLD_SHA:0:12}-${new_sha:0:12}.parquet}

echo "rescore.sh: comparing ${OLD_SHA:0:12} (A) with ${new_sha:0:12} (B)" >&2
run "${batchscore[@]}" diff "$DATASET" --model-a "$OLD_SHA" --model-b "$new_sha" \
    --max-changed-share "$MAX_CHANGED_SHARE" --output "$CHANGED"
