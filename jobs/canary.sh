#!/usr/bin/env bash
# canary.sh: bless or block a candidate model before rollout, on a labelled canary set.
#
# Runs `batchscore canary`: the candidate (and, with CURRENT, the model in production, on the
# same decoded images) is scored on the canary set, and the gate checks its accuracy and its
# drop against the current model. The report (predictions.parquet, canary.json, report.md,
# confusion_matrix.svg) goes to REPORT_DIR. The exit code is batchscore's, unchanged:
#   0 passed: roll out   3 the gate failed (each failed check on its own line): do not
#   1 unexpected failure   2 bad configuration
#
# Settings: environment variables, or the flags beside them (a flag wins).
#   CANARY_SET    --canary-set PATH   labelled images: a folder with one sub-folder per class,
#                                     or a manifest with path and label columns (required)
#   CANDIDATE     --candidate PATH    the model to check: directory or .onnx file (required)
#   MIN_ACCURACY  --min-accuracy X    fail below this top-1 accuracy (required)
#   CURRENT       --current PATH      the model in production (default: none, no drop check)
#   MAX_DROP      --max-drop X        with CURRENT: fail when the accuracy drops by more than
#                                     this (default: 0.01)
#   REPORT_DIR    --report DIR        where the report goes (default: ./canary-<UTC time>)
#   WORKERS       --workers N         worker processes (default: one per CPU)
#   BATCHSCORE    --batchscore CMD    how to run batchscore, split on spaces (default:
#                                     batchscore)
# Arguments after `--` go to `batchscore canary` as they are (e.g. -- --min-class-recall 0.5).
#
# Example:
#   CANARY_SET=/data/canary CANDIDATE=/models/v2 CURRENT=/models/v1 MIN_ACCURACY=0.9 \
#       jobs/canary.sh && deploy /models/v2

set -euo pipefail

CANARY_SET=${CANARY_SET:-}
CANDIDATE=${CANDIDATE:-}
MIN_ACCURACY=${MIN_ACCURACY:-}
CURRENT=${CURRENT:-}
MAX_DROP=${MAX_DROP:-0.01}
REPORT_DIR=${REPORT_DIR:-}
WORKERS=${WORKERS:-}
BATCHSCORE=${BATCHSCORE:-batchscore}

die() {
    echo "canary.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

while (($#)); do
    case $1 in
        --canary-set | --candidate | --min-accuracy | --current | --max-drop | --report | \
            --workers | --batchscore)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --canary-set) CANARY_SET=$2 ;;
                --candidate) CANDIDATE=$2 ;;
                --min-accuracy) MIN_ACCURACY=$2 ;;
                --current) CURRENT=$2 ;;
                --max-drop) MAX_DROP=$2 ;;
                --report) REPORT_DIR=$2 ;;
                --workers) WORKERS=$2 ;;
                --batchscore) BATCHSCORE=$2 ;;
            esac
            shift 2
            ;;
        -h | --help) usage && exit 0 ;;
        --) shift && break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ -n $CANARY_SET ]] || die "set CANARY_SET (or --canary-set): the labelled canary set"
[[ -n $CANDIDATE ]] || die "set CANDIDATE (or --candidate): the model to check"
[[ -n $MIN_ACCURACY ]] || die "set MIN_ACCURACY (or --min-accuracy): a gate must gate"
REPORT_DIR=${REPORT_DIR:-canary-$(date -u +%Y%m%dT%H%M%SZ)}

read -r -a batchscore <<<"$BATCHSCORE"
command=("${batchscore[@]}" canary "$CANARY_SET" --model "$CANDIDATE"
    --min-accuracy "$MIN_ACCURACY" --report "$REPORT_DIR")
if [[ -n $CURRENT ]]; then command+=(--baseline "$CURRENT" --max-drop "$MAX_DROP"); fi
if [[ -n $WORKERS ]]; then command+=(--workers "$WORKERS"); fi
command+=("$@")

echo "canary.sh: report -> $REPORT_DIR" >&2
# exec: signals reach batchscore directly and its exit code is this script's.
exec "${command[@]}"
