#!/usr/bin/env bash
# Run `jalign train` as N cooperating processes on this machine (multi-host rehearsal on CPU).
#
#   launch/local.sh N CONFIG.yaml [key=value ...]
#
# Each process gets its own simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K,
# JAX_PLATFORMS=cpu), the coordinator is 127.0.0.1 on a free port, process ids are 0..N-1
# (JALIGN_COORDINATOR / JALIGN_NUM_PROCESSES / JALIGN_PROCESS_ID, read by jalign.distributed).
# Output lines of process i>0 are prefixed "[pi]". The script waits for all processes; as soon as one
# fails, the others are stopped (SIGTERM, then SIGKILL after $GRACE seconds) and the script exits with
# the first failure's status. SIGINT/SIGTERM to the script are forwarded to every process (the trainer
# then checkpoints and stops on all of them together).
#
# Environment:
#   DEVICES_PER_PROCESS  simulated CPU devices per process (default 4)
#   JALIGN_PORT          coordinator port (default: a free one)
#   JALIGN_CMD           the command before "train" (default "python -m jalign")
#   GRACE                seconds between SIGTERM and SIGKILL when stopping the rest (default 10)
#   LOG_DIR              if set, also write each process's output to $LOG_DIR/process_<i>.log
set -uo pipefail

if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
N=$1; CONFIG=$2; shift 2
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then echo "local.sh: N must be a positive integer, got '$N'" >&2; exit 2; fi

K=${DEVICES_PER_PROCESS:-4}
GRACE=${GRACE:-10}
read -r -a CMD <<< "${JALIGN_CMD:-python -m jalign}"
PORT=${JALIGN_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# Keep the caller's XLA flags but replace any device count with ours.
BASE_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
[[ -n "${LOG_DIR:-}" ]] && mkdir -p "$LOG_DIR"

echo "local.sh: $N processes x $K CPU devices, coordinator 127.0.0.1:$PORT" >&2
PIDS=()
for ((i = 0; i < N; i++)); do
    prefix=""; [[ $i -gt 0 ]] && prefix="[p$i] "
    log=/dev/null; [[ -n "${LOG_DIR:-}" ]] && log="$LOG_DIR/process_$i.log"
    env JAX_PLATFORMS=cpu \
        XLA_FLAGS="$BASE_FLAGS --xla_force_host_platform_device_count=$K" \
        JALIGN_COORDINATOR="127.0.0.1:$PORT" JALIGN_NUM_PROCESSES="$N" JALIGN_PROCESS_ID="$i" \
        "${CMD[@]}" train "$CONFIG" "$@" \
        > >(tee -a "$log" | sed -u "s/^/$prefix/") 2>&1 &
    PIDS+=($!)
done

running() {  # exited-but-unreaped (zombie) processes do not count
    kill -0 "$1" 2>/dev/null || return 1
    [[ -r /proc/$1/stat ]] && [[ $(sed -E 's/^.*\) (.).*$/\1/' "/proc/$1/stat") == Z ]] && return 1
    return 0
}
alive() { for p in "${PIDS[@]}"; do running "$p" && echo "$p"; done; }
stop_all() {  # $1: signal for the first round
    local rest; rest=$(alive)
    [[ -z "$rest" ]] && return
    kill -"$1" $rest 2>/dev/null
    for ((t = 0; t < GRACE * 10; t++)); do
        [[ -z "$(alive)" ]] && return
        sleep 0.1
    done
    rest=$(alive); [[ -n "$rest" ]] && kill -KILL $rest 2>/dev/null
}
trap 'echo "local.sh: signal received, forwarding SIGTERM to all processes" >&2; kill -TERM $(alive) 2>/dev/null' TERM INT

status=0
PENDING=("${PIDS[@]}")
while [[ ${#PENDING[@]} -gt 0 ]]; do
    unset done_pid
    wait -n -p done_pid "${PENDING[@]}"
    rc=$?
    [[ -z "${done_pid:-}" ]] && continue  # interrupted by a trapped signal: keep waiting
    left=(); for p in "${PENDING[@]}"; do [[ $p != "$done_pid" ]] && left+=("$p"); done
    PENDING=("${left[@]}")
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
        for ((i = 0; i < N; i++)); do [[ ${PIDS[$i]} == "$done_pid" ]] && who=$i; done
        echo "local.sh: process ${who:-?} (pid $done_pid) exited with status $rc; stopping the others" >&2
        status=$rc
        stop_all TERM
    fi
done
wait  # the output filters
exit $status
