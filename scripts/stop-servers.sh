# Sourced by the server scripts: stop_servers DIR stops every server whose
# pid file is in DIR and waits until each has exited (SIGKILL after 10 s),
# so a following start does not race a server still holding its ports.
stop_servers() {
    shopt -s nullglob
    local pids=() pid pidfile
    for pidfile in "$1"/*.pid; do
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
}
