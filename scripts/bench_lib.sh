# Shared by server_search_bench.sh and index_bench.sh (sourced, not run): start `sspry serve`, wait until
# it answers, sample its /proc while phases run, time client commands with /usr/bin/time, summarise.
#
# The caller sets BIN, ROOT, ADDR, OUT, MODE_LABEL, SAMPLE_INTERVAL, READY_TIMEOUT and the array
# SERVER_EXTRA, then calls start_server; every timed step runs inside begin_phase/end_phase.

CLK_TCK=$(getconf CLK_TCK)
SERVER_PID=""
SAMPLER_PID=""

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/run.log" >&2; }
die() { log "error: $*"; exit 1; }

# One row of server_samples.tsv: time, phase, CPU ticks, and memory in kB from status and smaps_rollup.
sample_once() {
    local pid=$1 phase=$2 stat rest
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
    rest=${stat##*) }  # the process name may hold spaces: fields after it are fixed
    read -r -a fields <<<"$rest"
    awk -v ts="$(date +%s.%N)" -v phase="$phase" -v ut="${fields[11]}" -v st="${fields[12]}" '
        FNR == 1 { file++ }
        file == 1 && /^(VmRSS|RssAnon|VmSwap):/ { v[$1] = $2 }
        file == 2 && /^(Pss_Anon|Private_Clean|Private_Dirty):/ { v[$1] = $2 }
        END {
            printf "%.3f\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", ts, phase, ut, st, v["VmRSS:"], \
                v["RssAnon:"], v["VmSwap:"], v["Pss_Anon:"], v["Private_Clean:"], v["Private_Dirty:"]
        }' "/proc/$pid/status" "/proc/$pid/smaps_rollup" >>"$OUT/server_samples.tsv" 2>/dev/null || true
}

start_server() {
    command -v /usr/bin/time >/dev/null || die "/usr/bin/time is needed (Debian package 'time')"
    mkdir -p "$OUT"
    : >"$OUT/run.log"
    printf 'ts\tphase\tutime_ticks\tstime_ticks\tvmrss_kb\trssanon_kb\tvmswap_kb\tpss_anon_kb\tprivate_clean_kb\tprivate_dirty_kb\n' \
        >"$OUT/server_samples.tsv"
    printf 'mode_label\tphase\tclient_elapsed_s\tclient_user_s\tclient_system_s\tclient_cpu_s\tclient_avg_cpu_pct\tclient_max_rss_kb\tserver_cpu_s\tserver_avg_cpu_pct\tserver_max_vmrss_kb\tserver_max_rssanon_kb\tserver_max_vmswap_kb\tserver_max_pss_anon_kb\tserver_max_private_clean_kb\tserver_max_private_dirty_kb\tsample_count\n' \
        >"$OUT/phase_summary.tsv"
    echo idle >"$OUT/.phase"
    if "$BIN" info --addr "$ADDR" --timeout 2 >/dev/null 2>&1; then
        die "something already answers on $ADDR: stop it or choose another --addr"
    fi
    trap stop_server EXIT
    log "starting: $BIN serve --root $ROOT --addr $ADDR ${SERVER_EXTRA[*]}"
    "$BIN" serve --root "$ROOT" --addr "$ADDR" "${SERVER_EXTRA[@]}" >>"$OUT/run.log" 2>&1 &
    SERVER_PID=$!
    local waited=0
    until "$BIN" info --addr "$ADDR" --timeout 5 >"$OUT/info_start.json" 2>/dev/null; do
        kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited (see $OUT/run.log)"
        ((waited++ < READY_TIMEOUT)) || die "the server did not answer within ${READY_TIMEOUT}s"
        sleep 1
    done
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited (see $OUT/run.log)"
    log "server ready (pid $SERVER_PID)"
    (
        while kill -0 "$SERVER_PID" 2>/dev/null; do
            sample_once "$SERVER_PID" "$(cat "$OUT/.phase")"
            sleep "$SAMPLE_INTERVAL"
        done
    ) &
    SAMPLER_PID=$!
}

stop_server() {
    set +e  # runs from the EXIT trap: every step must be tried
    if [[ -n $SAMPLER_PID ]]; then
        kill "$SAMPLER_PID" 2>/dev/null
        wait "$SAMPLER_PID" 2>/dev/null
    fi
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        "$BIN" info --addr "$ADDR" --timeout 10 >"$OUT/info_end.json" 2>/dev/null || true
        "$BIN" shutdown --addr "$ADDR" --timeout 10 >>"$OUT/run.log" 2>&1 || kill "$SERVER_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        log "server stopped"
    fi
    SERVER_PID=""
    SAMPLER_PID=""
}

# Time one client command: /usr/bin/time writes "elapsed user system cpu% max_rss_kb" to $1.
timed() {
    local into=$1
    shift
    /usr/bin/time -f '%e\t%U\t%S\t%P\t%M' -o "$into" "$@"
}

begin_phase() {
    echo "$1" >"$OUT/.phase"
    sample_once "$SERVER_PID" "$1"
    : >"$OUT/.phase_times"
}

# Append the timing lines of one client run (the output of `timed`) to the phase being measured.
add_time() { tail -n 1 "$1" >>"$OUT/.phase_times"; }

# Close a phase: client times summed over its runs, server CPU from the tick counters at its ends,
# server memory maxima over its samples; one row of phase_summary.tsv.
end_phase() {
    local phase=$1
    sample_once "$SERVER_PID" "$phase"
    echo idle >"$OUT/.phase"
    awk -F'\t' -v label="$MODE_LABEL" -v phase="$phase" -v tck="$CLK_TCK" '
        FNR == 1 { file++ }
        file == 1 { e += $1; u += $2; s += $3; if ($5 > rss) rss = $5; next }
        file == 2 && FNR > 1 && $2 == phase {
            ticks = $3 + $4
            if (!n++) first = ticks
            last = ticks; t0 = (n == 1 ? $1 : t0); t1 = $1
            for (i = 5; i <= 10; i++) if ($i > m[i]) m[i] = $i
        }
        END {
            cpu = (last - first) / tck
            span = t1 - t0
            printf "%s\t%s\t%.3f\t%.3f\t%.3f\t%.3f\t%.1f\t%d\t%.3f\t%.1f", label, phase, e, u, s, u + s, \
                (e > 0 ? 100 * (u + s) / e : 0), rss, cpu, (span > 0 ? 100 * cpu / span : 0)
            for (i = 5; i <= 10; i++) printf "\t%d", m[i]
            printf "\t%d\n", n
        }' "$OUT/.phase_times" "$OUT/server_samples.tsv" >>"$OUT/phase_summary.tsv"
    log "phase $phase done: $(tail -n 1 "$OUT/phase_summary.tsv" | cut -f3,9,11)"
}
