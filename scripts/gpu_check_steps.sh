# Capped steps and their summary table, for scripts/gpu_check.sh (sourced; not run alone).
#
# Expects OUT_DIR (with logs/ in it) and DEADLINE (seconds from the start); sets `failed`
# to 1 when a step does not pass.  `step NAME CAP COMMAND...` runs COMMAND under `timeout`
# for CAP seconds or the time left before the deadline, whichever is less, or skips it
# when less than MIN_STEP seconds are left; `skip NAME CAP WHY` records a step that cannot
# run; after either, OUT_DIR/summary.md is written again.
# shellcheck shell=bash
MIN_STEP=5  # a step with less time than this left is skipped, not started
SUMMARY="$OUT_DIR/summary.md"
T0=$SECONDS
ROWS=()
failed=0
CURRENT=""

write_summary() {
    {
        echo "# gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), deadline ${DEADLINE}s, $((SECONDS - T0))s used)"
        echo
        echo "| step | status | seconds | cap | log | tally |"
        echo "|---|---|---:|---:|---|---|"
        local row
        for row in "${ROWS[@]}"; do echo "$row"; done
        if [ -n "$CURRENT" ]; then echo "| $CURRENT | NOT FINISHED (running, or killed) | | | | |"; fi
        local notes  # what the preflight found missing, why the extension check failed
        notes=$(grep -h -E "^(MISSING|FAILED): " "$OUT_DIR"/logs/*.log 2> /dev/null)
        if [ -n "$notes" ]; then
            echo
            sed 's/^/- /' <<< "$notes"
        fi
    } > "$SUMMARY"
}

# the last pytest tally line of a log ("3 passed, 1 skipped in 12.3s"), if any
tally() {
    grep -a -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)|no tests ran" "$1" 2>/dev/null \
        | tail -n 1 | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//' -e 's/|/\//g'
}

# new_log NAME: LOG := the step's own log, numbered in plan order (logs/03_build-extension.log)
STEP_NO=0
LOG=""
new_log() {
    STEP_NO=$((STEP_NO + 1))
    local slug
    slug=$(printf '%s' "$1" | tr -c 'a-zA-Z0-9_-' '-' | tr -s '-' | sed 's/-$//')
    LOG=$(printf '%s/logs/%02d_%s.log' "$OUT_DIR" "$STEP_NO" "$slug")
}

# record NAME STATUS SECONDS CAP LOG
record() {
    ROWS+=("| $1 | $2 | $3 | $4 | ${5#"$OUT_DIR"/} | $(tally "$5") |")
    case "$2" in pass) ;; *) failed=1 ;; esac
    write_summary
}

# step NAME CAP COMMAND...: COMMAND under `timeout`, capped at CAP seconds or the time
# left, whichever is less; its output written to the step's log and shown.
step() {
    new_log "$1"
    local name="$1" cap="$2" log="$LOG"
    shift 2
    local left=$((DEADLINE - (SECONDS - T0)))
    if [ "$left" -lt "$MIN_STEP" ]; then
        echo "== $name: SKIPPED (deadline: ${left}s left)" | tee -a "$log"
        record "$name" "SKIPPED (deadline)" 0 "$cap" "$log"
        return 1
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $name (cap ${limit}s): $*" | tee -a "$log"
    CURRENT="$name"
    write_summary
    local t=$SECONDS
    # SIGINT first: pytest then prints what it ran so far; KILL 5 s later
    timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]} status=pass
    CURRENT=""
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (exit $rc)"
    fi
    echo "== $name: $status in $((SECONDS - t))s" | tee -a "$log"
    record "$name" "$status" "$((SECONDS - t))" "$limit" "$log"
    [ "$status" = pass ]
}

# skip NAME CAP WHY: a step that cannot run, said so
skip() {
    new_log "$1"
    echo "== $1: SKIPPED ($3)" | tee -a "$LOG"
    record "$1" "SKIPPED ($3)" 0 "$2" "$LOG"
}

