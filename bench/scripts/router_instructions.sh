#!/usr/bin/env bash
# Instructions the router executes per transaction, [metrics] off and on:
# a release `hapg router run` (one worker, transaction pooling) under
# valgrind's callgrind while `pgbench -S -n -c 1 -t N` runs through it, for
# two values of N; the difference over the difference of N removes what does
# not grow with the transactions (start, login, shutdown). What grows with
# time instead (the follower's ticks, about one a second) stays in, and is
# small next to thousands of transactions. Instruction counts, not time, so
# a machine loaded by other work gives about the same answer.
#
#   bench/scripts/router_instructions.sh [path/to/release/hapg]
#
# Runs as root (hapg runs Postgres as the postgres OS user) or as postgres.
set -euo pipefail

HAPG=$(realpath "${1:-target/release/hapg}")
N1=${N1:-1000}
N2=${N2:-4000}
BIN=/usr/lib/postgresql/15/bin

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

dir=$(mktemp -d /tmp/hapg-instructions-XXXXXX)
chmod 755 "$dir"
cd "$dir"
export XDG_CONFIG_HOME=$dir/xdg/config XDG_DATA_HOME=$dir/xdg/data
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_for() { # what, command...
    local what=$1; shift
    for _ in $(seq 1 600); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "timed out waiting for $what" >&2
    exit 1
}

mport=$(free_port)
"$HAPG" create monitor --pgdata ./monitor --pgport "$mport" --hostname localhost \
    --auth trust --ssl-self-signed --run >monitor.log 2>&1 &
pids+=($!)
wait_for "the monitor" "$HAPG" show state --pgdata ./monitor
uri=$("$HAPG" show uri --pgdata ./monitor --monitor-uri | tr -d '[:space:]')
nport=$(free_port)
"$HAPG" create postgres --pgdata ./node --pgport "$nport" --hostname localhost --name node_a \
    --dbname bench --auth trust --ssl-self-signed --monitor "$uri" --run >node.log 2>&1 &
pids+=($!)
wait_for "the node to take writes" "$BIN/psql" -X -h 127.0.0.1 -p "$nport" -U postgres -d bench \
    -c "CREATE TABLE IF NOT EXISTS ready (x int)"
"$BIN/pgbench" -q -i -s 1 -h 127.0.0.1 -p "$nport" -U postgres bench >/dev/null 2>&1

instructions() { # metrics(on|off) transactions -> total Ir of the router's run
    local metrics=$1 n=$2 rport
    rport=$(free_port)
    {
        printf '[router]\nlisten = "127.0.0.1:%s"\nmonitor = "%s"\nformation = "default"\n' "$rport" "$uri"
        printf 'worker_threads = 1\n\n[auth]\ntype = "trust"\n\n[server]\nsslmode = "disable"\n\n'
        printf '[pool]\nmode = "transaction"\npool_size = 4\n'
        if [ "$metrics" = on ]; then printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$(free_port)"; fi
    } >router-$metrics-$n.toml
    valgrind --tool=callgrind --callgrind-out-file="$dir/cg-$metrics-$n.out" \
        "$HAPG" router run --config router-$metrics-$n.toml >router-$metrics-$n.log 2>&1 &
    local vg=$!
    wait_for "the router" "$BIN/psql" -X -h 127.0.0.1 -p "$rport" -U postgres -d bench -c "SELECT 1"
    "$BIN/pgbench" -n -S -c 1 -t "$n" -h 127.0.0.1 -p "$rport" -U postgres bench >pgbench-$metrics-$n.log 2>&1
    kill -TERM "$vg"
    wait "$vg" || true
    # The summary line of every dump (one per thread) added up.
    cat "$dir"/cg-$metrics-$n.out* | awk '/^summary:/ { s += $2 } END { print s }'
}

for metrics in off on; do
    a=$(instructions "$metrics" "$N1")
    b=$(instructions "$metrics" "$N2")
    echo "metrics $metrics: $a instructions for $N1 transactions, $b for $N2: $(( (b - a) / (N2 - N1) )) per transaction"
done
echo "(kept in $dir)"
trap - EXIT
cleanup
