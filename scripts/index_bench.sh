#!/usr/bin/env bash
# Index benchmark through a real `sspry serve`: MB/s, files/s, client and server CPU and memory.
#
#   scripts/index_bench.sh --root DIR --addr HOST:PORT --out DIR [--path-list] PATHS... \
#       [--init] [--init-extra-arg ARG]... [--workers N] [--batch-bytes N] \
#       [--server-extra-arg ARG]... [--index-extra-arg ARG]... \
#       [--ready-timeout 180] [--sample-interval 1] [--mode-label default]
#
# --init creates the forest first (`sspry init --root DIR --force` plus --init-extra-arg), otherwise ROOT
# must be initialised. Starts the server, samples its /proc to server_samples.tsv (as
# server_search_bench.sh does), runs `sspry index PATHS` under /usr/bin/time, and writes
# index_summary.tsv (files, bytes, MB/s, files/s, client CPU and peak RSS, server CPU and peak memory,
# database bytes before and after), phase_summary.tsv and run.log. Input bytes are counted from the
# files the paths name (directories walked; with --path-list, the listed paths). BIN (default: sspry).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench_lib.sh

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

BIN=${BIN:-sspry}
ROOT="" ADDR="" OUT="" INIT=0 PATH_LIST=0 WORKERS=0 BATCH_BYTES=""
READY_TIMEOUT=180 SAMPLE_INTERVAL=1 MODE_LABEL=default
INIT_EXTRA=() SERVER_EXTRA=() INDEX_EXTRA=() PATHS=()
while (($#)); do
    case $1 in
        --root) ROOT=$2; shift ;;
        --addr) ADDR=$2; shift ;;
        --out) OUT=$2; shift ;;
        --init) INIT=1 ;;
        --init-extra-arg) INIT_EXTRA+=("$2"); shift ;;
        --path-list) PATH_LIST=1 ;;
        --workers) WORKERS=$2; shift ;;
        --batch-bytes) BATCH_BYTES=$2; shift ;;
        --server-extra-arg) SERVER_EXTRA+=("$2"); shift ;;
        --index-extra-arg) INDEX_EXTRA+=("$2"); shift ;;
        --ready-timeout) READY_TIMEOUT=$2; shift ;;
        --sample-interval) SAMPLE_INTERVAL=$2; shift ;;
        --mode-label) MODE_LABEL=$2; shift ;;
        -h | --help) usage 0 ;;
        -*) echo "unknown argument: $1" >&2; usage ;;
        *) PATHS+=("$1") ;;
    esac
    shift
done
[[ -n $ROOT && -n $ADDR && -n $OUT ]] || { echo "--root, --addr and --out are required" >&2; usage; }
((${#PATHS[@]})) || { echo "no PATHS to index" >&2; usage; }

mkdir -p "$OUT"
if ((INIT)); then
    "$BIN" init --root "$ROOT" --force "${INIT_EXTRA[@]}" >"$OUT/init.log"
fi

# Files and bytes of the input, counted the way `sspry index` walks it (sspry/features/walk.py): each
# path given, directories walked without following their symlinked subdirectories, every name that is
# (or links to) a regular file, once per absolute path. `find -type f` skipped the symlinks to files
# (/usr/bin has hundreds) and undercounted the input.
if ((PATH_LIST)); then
    mapfile -t TARGETS < <(cat "${PATHS[@]}")
else
    TARGETS=("${PATHS[@]}")
fi
read -r INPUT_FILES INPUT_BYTES < <(python3 - "${TARGETS[@]}" <<'PY'
import os, stat, sys
seen = {}
def add(path, info):
    seen[os.path.abspath(path)] = info.st_size
for root in sys.argv[1:]:
    try:
        info = os.stat(root)
    except OSError:
        continue
    if stat.S_ISDIR(info.st_mode):
        for directory, _, names in os.walk(root):
            for name in names:
                try:
                    found = os.stat(os.path.join(directory, name))
                except OSError:
                    continue
                if stat.S_ISREG(found.st_mode):
                    add(os.path.join(directory, name), found)
    elif stat.S_ISREG(info.st_mode):
        add(root, info)
print(len(seen), sum(seen.values()))
PY
)

start_server
db_bytes() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["disk_bytes"])' "$1"; }
BYTES_BEFORE=$(db_bytes "$OUT/info_start.json")

ARGS=(index --addr "$ADDR" --workers "$WORKERS" --json)
[[ -n $BATCH_BYTES ]] && ARGS+=(--batch-bytes "$BATCH_BYTES")
((PATH_LIST)) && ARGS+=(--path-list)
begin_phase index
rc=0
timed "$OUT/index.time" "$BIN" "${ARGS[@]}" "${INDEX_EXTRA[@]}" "${PATHS[@]}" \
    >"$OUT/index.json" 2>"$OUT/index.err" || rc=$?
add_time "$OUT/index.time"
end_phase index
((rc == 0)) || die "sspry index failed (exit $rc): $(tail -n 5 "$OUT/index.err")"

"$BIN" info --addr "$ADDR" >"$OUT/info_after.json"
BYTES_AFTER=$(db_bytes "$OUT/info_after.json")
printf 'mode_label\tfiles\tinput_bytes\telapsed_s\tmb_per_s\tfiles_per_s\tclient_cpu_s\tclient_max_rss_kb\tserver_cpu_s\tserver_max_vmrss_kb\tserver_max_rssanon_kb\tdb_bytes_before\tdb_bytes_after\tdb_pct_of_input\n' \
    >"$OUT/index_summary.tsv"
tail -n 1 "$OUT/phase_summary.tsv" | awk -F'\t' -v OFS='\t' -v label="$MODE_LABEL" -v files="$INPUT_FILES" \
    -v bytes="$INPUT_BYTES" -v before="$BYTES_BEFORE" -v after="$BYTES_AFTER" '{
        e = ($3 > 0 ? $3 : 1e-9)
        printf "%s\t%d\t%d\t%.3f\t%.2f\t%.1f\t%.3f\t%d\t%.3f\t%d\t%d\t%d\t%d\t%.2f\n", label, files, bytes, $3, \
            bytes / e / 1e6, files / e, $6, $8, $9, $11, $12, before, after, \
            (bytes > 0 ? 100 * (after - before) / bytes : 0)
    }' >>"$OUT/index_summary.tsv"
log "index: $(cut -f2-6 "$OUT/index_summary.tsv" | tail -n 1)"
