#!/usr/bin/env bash
# Search benchmark against a real `sspry serve`, in the spirit of the original's script of the same name.
#
#   scripts/server_search_bench.sh --root DIR --addr HOST:PORT --out DIR \
#       [--rule-list FILE] [--bundle-rule FILE] [--skip-individual] [--skip-bundle] \
#       [--search-workers N] [--server-extra-arg ARG]... [--search-extra-arg ARG]... \
#       [--ready-timeout 180] [--search-timeout 86400] [--sample-interval 1] [--mode-label default]
#
# Starts the server on an initialised forest, waits until it answers, samples its /proc every
# --sample-interval seconds (CPU ticks, VmRSS, RssAnon, VmSwap, Pss_Anon, Private_Clean, Private_Dirty) to
# server_samples.tsv, times every rule file of --rule-list (one path per line) and then --bundle-rule with
# /usr/bin/time, and writes individual_summary.tsv (one row per rule file), phase_summary.tsv (one row per
# phase: client time and CPU, server CPU and peak memory), run.log, and each search's output under
# searches/. The server is shut down on exit, also on failure. BIN (default: sspry) is the command used.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench_lib.sh

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

BIN=${BIN:-sspry}
ROOT="" ADDR="" OUT="" RULE_LIST="" BUNDLE_RULE=""
SKIP_INDIVIDUAL=0 SKIP_BUNDLE=0 SEARCH_WORKERS=0
READY_TIMEOUT=180 SEARCH_TIMEOUT=86400 SAMPLE_INTERVAL=1 MODE_LABEL=default
SERVER_EXTRA=() SEARCH_EXTRA=()
while (($#)); do
    case $1 in
        --root) ROOT=$2; shift ;;
        --addr) ADDR=$2; shift ;;
        --out) OUT=$2; shift ;;
        --rule-list) RULE_LIST=$2; shift ;;
        --bundle-rule) BUNDLE_RULE=$2; shift ;;
        --skip-individual) SKIP_INDIVIDUAL=1 ;;
        --skip-bundle) SKIP_BUNDLE=1 ;;
        --search-workers) SEARCH_WORKERS=$2; shift ;;
        --server-extra-arg) SERVER_EXTRA+=("$2"); shift ;;
        --search-extra-arg) SEARCH_EXTRA+=("$2"); shift ;;
        --ready-timeout) READY_TIMEOUT=$2; shift ;;
        --search-timeout) SEARCH_TIMEOUT=$2; shift ;;
        --sample-interval) SAMPLE_INTERVAL=$2; shift ;;
        --mode-label) MODE_LABEL=$2; shift ;;
        -h | --help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
    shift
done
[[ -n $ROOT && -n $ADDR && -n $OUT ]] || { echo "--root, --addr and --out are required" >&2; usage; }
((SKIP_INDIVIDUAL && SKIP_BUNDLE)) && { echo "--skip-individual and --skip-bundle exclude each other" >&2; usage; }
((SKIP_INDIVIDUAL)) || [[ -n $RULE_LIST ]] || { echo "--rule-list is required (or --skip-individual)" >&2; usage; }
((SKIP_BUNDLE)) || [[ -n $BUNDLE_RULE ]] || { echo "--bundle-rule is required (or --skip-bundle)" >&2; usage; }
[[ -z $RULE_LIST || -r $RULE_LIST ]] || { echo "cannot read --rule-list $RULE_LIST" >&2; exit 2; }
[[ -z $BUNDLE_RULE || -r $BUNDLE_RULE ]] || { echo "cannot read --bundle-rule $BUNDLE_RULE" >&2; exit 2; }

SERVER_EXTRA=(--search-workers "$SEARCH_WORKERS" "${SERVER_EXTRA[@]}")
mkdir -p "$OUT/searches"
start_server

# One search through /usr/bin/time; prints "rc<TAB>rules<TAB>candidates" for the summary rows.
search_one() {
    local rule=$1 name=$2 rc=0
    timed "$OUT/searches/$name.time" timeout "$SEARCH_TIMEOUT" \
        "$BIN" search --rule "$rule" --addr "$ADDR" --json "${SEARCH_EXTRA[@]}" \
        >"$OUT/searches/$name.json" 2>"$OUT/searches/$name.err" || rc=$?
    add_time "$OUT/searches/$name.time"
    local counts="0	0"
    if ((rc == 0)); then
        counts=$(python3 -c 'import json, sys
rules = json.load(open(sys.argv[1]))["rules"]
print(len(rules), sum(rule["candidate_count"] for rule in rules), sep="\t")' "$OUT/searches/$name.json")
    else
        log "search of $rule failed (exit $rc): $(head -c 300 "$OUT/searches/$name.err")"
    fi
    printf '%s\t%s\n' "$rc" "$counts"
}

if ((!SKIP_INDIVIDUAL)); then
    printf 'mode_label\trule_file\texit\trules\tcandidates\telapsed_s\tuser_s\tsystem_s\tcpu_pct\tmax_rss_kb\n' \
        >"$OUT/individual_summary.tsv"
    begin_phase individual
    number=0
    while IFS= read -r rule || [[ -n $rule ]]; do
        [[ -z ${rule// /} || $rule == \#* ]] && continue
        number=$((number + 1))
        result=$(search_one "$rule" "$(printf 'rule-%05d' "$number")")
        times=$(tail -n 1 "$OUT/searches/$(printf 'rule-%05d' "$number").time")
        printf '%s\t%s\t%s\t%s\n' "$MODE_LABEL" "$rule" "$result" "$times" >>"$OUT/individual_summary.tsv"
    done <"$RULE_LIST"
    end_phase individual
    log "individual: $number rule files"
fi

if ((!SKIP_BUNDLE)); then
    begin_phase bundle
    result=$(search_one "$BUNDLE_RULE" bundle)
    cp "$OUT/searches/bundle.time" "$OUT/bundle.time"
    end_phase bundle
    log "bundle: exit, rules, candidates = $(echo "$result" | tr '\t' ' ')"
fi
