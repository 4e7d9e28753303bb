#!/usr/bin/env bash
# nightly.sh: score the new images of an uploads folder into a Parquet dataset (cron, systemd).
#
# The run is incremental: images this model already scored are skipped and files whose content
# changed are scored again (a half-uploaded file, once complete, too), so running it again after
# a kill, a crash or a reboot finishes the work and never duplicates a row. Every run appends
# to a log; when a run fails, its lines go to stderr too, so cron mails them (and a successful
# run stays silent). The exit code is batchscore's, unchanged:
#   0 done (error rows included)   1 unexpected failure   2 bad configuration
#   4 more than MAX_ERROR_RATE of the new images failed (their rows are written)
#   75 another run holds the dataset's lock: nothing done, the next run catches up
#   130/143 stopped by SIGINT/SIGTERM (passed on to batchscore): the next run resumes
#   3 (with MONITOR_REFERENCE) scored, then `batchscore monitor` found drift in tonight's run:
#     its ALERT lines (what moved most) and the report's path in the log, the report in
#     DATASET/_monitor/<run id>/ (a bucket DATASET: beside LOG). A night that exits 4 is
#     monitored too, and keeps its 4; a night with no new uploads is not monitored (the log
#     says so), so an old alert is never sent again.
#
# Settings: environment variables, or the flags beside them (a flag wins).
#   UPLOADS         --uploads DIR        folder of images to score (required)
#   DATASET         --dataset DIR        the dataset directory, or a bucket URL (required)
#   MODEL           --model PATH         model directory or .onnx file (default: bundled model)
#   LOG             --log FILE           log appended to (default: DATASET/_logs/nightly.log;
#                                        readers skip names starting with '_')
#   MAX_ERROR_RATE  --max-error-rate X   exit 4 when more than this share failed (default:
#                                        0.05; empty: no limit)
#   RETRY_ERRORS=1  --retry-errors       also retry files that failed and have not changed since
#                                        (default: only a changed file is tried again, so one
#                                        broken upload does not fail every night after)
#   WAIT_LOCK=1     --wait-lock          wait for a run holding the lock instead of exiting 75
#   RESCORE_ALL=1   --rescore-all        after a model change, score every upload again with the
#                                        new model (default: an image any model scored is done,
#                                        so a new model scores only new uploads; jobs/rescore.sh
#                                        rescores and diffs the two models)
#   WORKERS         --workers N          worker processes (default: one per CPU)
#   BATCHSCORE      --batchscore CMD     how to run batchscore, split on spaces (default:
#                                        batchscore; e.g. "/opt/venv/bin/python -m batchscore")
#   MONITOR_REFERENCE  --monitor-reference PATH  after a run that scored new uploads, compare
#                                        it with this reference (a canary --report folder, a
#                                        dataset, a date partition or a file) with
#                                        `batchscore monitor --run <tonight's run id>`
#   MONITOR_ARGS    --monitor-args ARGS  more options for `batchscore monitor`, split on spaces
#                                        (e.g. "--alpha 0.001 --max-js 0.2")
#   RUN_ID          --run-id ID          tonight's run id (default: the UTC time and a random
#                                        suffix, as batchscore makes them)
# Arguments after `--` go to `batchscore score` as they are.
#
# Example:
#   UPLOADS=/data/uploads DATASET=/data/preds jobs/nightly.sh
#   jobs/nightly.sh --uploads /data/uploads --dataset /data/preds --wait-lock -- --top-k 3

set -euo pipefail

UPLOADS=${UPLOADS:-}
DATASET=${DATASET:-}
MODEL=${MODEL:-}
LOG=${LOG:-}
MAX_ERROR_RATE=${MAX_ERROR_RATE-0.05}
RETRY_ERRORS=${RETRY_ERRORS:-0}
WAIT_LOCK=${WAIT_LOCK:-0}
RESCORE_ALL=${RESCORE_ALL:-0}
WORKERS=${WORKERS:-}
BATCHSCORE=${BATCHSCORE:-batchscore}
MONITOR_REFERENCE=${MONITOR_REFERENCE:-}
MONITOR_ARGS=${MONITOR_ARGS:-}
RUN_ID=${RUN_ID:-}

die() {
    echo "nightly.sh: $*" >&2
    exit 2
}

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

while (($#)); do
    case $1 in
        --uploads | --dataset | --model | --log | --max-error-rate | --workers | --batchscore | \
            --monitor-reference | --monitor-args | --run-id)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --uploads) UPLOADS=$2 ;;
                --dataset) DATASET=$2 ;;
                --model) MODEL=$2 ;;
                --log) LOG=$2 ;;
                --max-error-rate) MAX_ERROR_RATE=$2 ;;
                --workers) WORKERS=$2 ;;
                --batchscore) BATCHSCORE=$2 ;;
                --monitor-reference) MONITOR_REFERENCE=$2 ;;
                --monitor-args) MONITOR_ARGS=$2 ;;
                --run-id) RUN_ID=$2 ;;
            esac
            shift 2
            ;;
        --retry-errors) RETRY_ERRORS=1 && shift ;;
        --wait-lock) WAIT_LOCK=1 && shift ;;
        --rescore-all) RESCORE_ALL=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        --) shift && break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ -n $UPLOADS ]] || die "set UPLOADS (or --uploads): the folder of images to score"
[[ -n $DATASET ]] || die "set DATASET (or --dataset): the dataset directory"
DATASET=${DATASET%/}
reports=$DATASET
if [[ $DATASET == *://* ]]; then  # a bucket (docs/object-storage.md): log and reports stay local
    [[ -n $LOG ]] || die "DATASET is in a bucket: set LOG (or --log) to a local file"
    reports=$(dirname "$LOG")
fi
LOG=${LOG:-$DATASET/_logs/nightly.log}

# Tonight's run id, so that the monitor looks at exactly this run (and the report is named
# after it); one given after `--` to batchscore wins.
for ((i = 1; i < $#; i++)); do
    if [[ ${!i} == --run-id ]]; then
        next=$((i + 1))
        RUN_ID=${!next}
    fi
done
if [[ -z $RUN_ID ]]; then
    RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
fi

read -r -a batchscore <<<"$BATCHSCORE"
read -r -a monitor_args <<<"$MONITOR_ARGS"
command=("${batchscore[@]}" score "$UPLOADS" -o "$DATASET/" --incremental --run-id "$RUN_ID")
if [[ -n $MODEL ]]; then command+=(--model "$MODEL"); fi
if [[ -n $MAX_ERROR_RATE ]]; then command+=(--max-error-rate "$MAX_ERROR_RATE"); fi
if [[ -n $WORKERS ]]; then command+=(--workers "$WORKERS"); fi
if [[ $RETRY_ERRORS == 1 ]]; then command+=(--retry-errors); else command+=(--no-retry-errors); fi
if [[ $WAIT_LOCK == 1 ]]; then command+=(--wait-lock); fi
if [[ $RESCORE_ALL != 1 ]]; then command+=(--any-model); fi
command+=("$@")

mkdir -p "$(dirname "$LOG")" 2>/dev/null || die "cannot create the folder of LOG=$LOG"
exec 3>>"$LOG" || die "cannot append to LOG=$LOG"
log_start=$(wc -c <"$LOG")

stamp() {
    date -u +%Y-%m-%dT%H:%M:%SZ
}

meaning() {
    case $1 in
        0) echo "done" ;;
        2) echo "bad configuration" ;;
        3) echo "ALERT: monitor found drift against $MONITOR_REFERENCE" ;;
        4) echo "too many images failed; their rows are written" ;;
        75) echo "another run holds the dataset's lock; nothing done" ;;
        130 | 143) echo "stopped by a signal; the next run resumes" ;;
        *) echo "failed" ;;
    esac
}

printf -v shown '%q ' "${command[@]}"
echo "$(stamp) nightly.sh[$$] start: ${shown% }" >&3
started=$SECONDS

# batchscore runs in the background so that a SIGTERM or SIGINT sent to this script (systemctl
# stop, kill) reaches it: it commits what it scored and exits 143 or 130.
"${command[@]}" >&3 2>&3 &
child=$!
trap 'forwarded=TERM && kill -s TERM "$child" 2>/dev/null || true' TERM
trap 'forwarded=INT && kill -s INT "$child" 2>/dev/null || true' INT
while :; do
    forwarded=""
    status=0
    wait "$child" || status=$?
    if [[ -z $forwarded ]]; then break; fi # a forwarded signal cut the wait short: wait again
done
trap - TERM INT

# How many images tonight's run scored (its summary; none when it never got that far).
scored_tonight() {
    "${batchscore[@]}" runs "$DATASET/" --field run_id,status,n_images 2>/dev/null |
        awk -F '\t' -v run="\"$RUN_ID\"" -v bare="$RUN_ID" \
            '($1 == run || $1 == bare) && $2 ~ /complete/ { n += $3 } END { print n + 0 }'
}

if ((status == 0 || status == 4)) && [[ -n $MONITOR_REFERENCE ]]; then
    if (($(scored_tonight) == 0)); then
        echo "$(stamp) nightly.sh[$$] no new uploads tonight: nothing to monitor" >&3
    else
        report="$reports/_monitor/$RUN_ID"
        monitored=0
        "${batchscore[@]}" monitor "$DATASET" --reference "$MONITOR_REFERENCE" --run "$RUN_ID" \
            --report "$report" "${monitor_args[@]}" >&3 2>&3 || monitored=$?
        if [[ -f $report/report.md ]]; then
            echo "$(stamp) nightly.sh[$$] monitor report: $report/report.md" >&3
        elif ((monitored != 0)); then  # tonight's rows are in: a rerun would find nothing new
            printf -v later '%q ' "${batchscore[@]}" monitor "$DATASET" --reference \
                "$MONITOR_REFERENCE" --run "$RUN_ID" --report "$report" "${monitor_args[@]}"
            echo "$(stamp) nightly.sh[$$] tonight is not monitored; once fixed: ${later% }" >&3
        fi
        if ((status == 0)); then status=$monitored; fi
    fi
fi

echo "$(stamp) nightly.sh[$$] exit $status: $(meaning "$status") ($((SECONDS - started)) s)" >&3
exec 3>&-
if ((status != 0)); then
    tail -c +"$((log_start + 1))" "$LOG" >&2
fi
exit "$status"
