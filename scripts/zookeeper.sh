#!/usr/bin/env bash
# Installs ZooKeeper and runs it on loopback for dprim's tests.
#
#   scripts/zookeeper.sh install           apt-get zookeeper (Java must be present)
#   scripts/zookeeper.sh start             standalone server, client port 2181
#   scripts/zookeeper.sh start-ensemble    3 servers, client ports 12181 22181 32181
#   scripts/zookeeper.sh restart-member N  restart ensemble member zN (after a kill), keeping its data
#   scripts/zookeeper.sh stop              stop whatever this script started
#
# Data, config, logs and pid files live under $DPRIM_SERVERS_DIR (default
# /tmp/dprim-servers)/zookeeper. $DPRIM_ZK_PORT overrides the standalone
# client port; $DPRIM_ZK_CONF_EXTRA names a file whose lines are appended to
# the standalone server's zoo.cfg (e.g. a TLS client port, see the
# backend's TLS test). Test servers use tickTime=500 so sessions down to 1 s are
# allowed (ZooKeeper's floor is 2 x tickTime); production keeps the defaults.
set -euo pipefail
# shellcheck source=stop-servers.sh
. "$(dirname "${BASH_SOURCE[0]}")/stop-servers.sh"
DIR="${DPRIM_SERVERS_DIR:-/tmp/dprim-servers}/zookeeper"
PORT="${DPRIM_ZK_PORT:-2181}"
# netty-codec is missing from the class path in the Debian jar's manifest; the
# Netty connection factory (TLS client ports) needs it.
CLASSPATH_JARS="/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar:/usr/share/java/netty-codec.jar"

install() {
    if [ -f /usr/share/java/zookeeper.jar ] && [ -f /usr/share/java/slf4j-simple.jar ]; then
        return
    fi
    if ! command -v java >/dev/null; then
        echo "error: ZooKeeper needs Java; install a JRE (e.g. apt-get install default-jre-headless)" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q zookeeper libslf4j-java >/dev/null ||
        { apt-get update -q >/dev/null && apt-get install -y -q zookeeper libslf4j-java >/dev/null; }
}

# Answers 0 once the server on $1 says `imok` to `ruok`.
ruok() { # port
    local answer
    answer=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'ruok' >&3 && timeout 1 cat <&3) 2>/dev/null || true)
    [ "$answer" = imok ]
}

# Answers 0 once the server on $1 serves clients (an ensemble member that
# is up but has no quorum yet answers `imok` to `ruok` too).
serving() { # port
    local answer
    answer=$( (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'srvr' >&3 && timeout 1 cat <&3) 2>/dev/null || true)
    printf '%s' "$answer" | grep -q '^Mode: '
}

wait_ready() { # port
    for _ in $(seq 1 300); do
        if ruok "$1" && serving "$1"; then
            return 0
        fi
        sleep 0.1
    done
    echo "error: ZooKeeper on 127.0.0.1:$1 did not become ready within 30 s; see $DIR/*.log" >&2
    return 1
}

common_config() { # data_dir client_port
    cat <<CFG
tickTime=500
initLimit=20
syncLimit=10
dataDir=$1
clientPort=$2
clientPortAddress=127.0.0.1
4lw.commands.whitelist=*
admin.enableServer=false
maxClientCnxns=0
CFG
}

launch() { # name
    local name=$1
    java -Xmx512m -Dzookeeper.jmx.log4j.disable=true -cp "$CLASSPATH_JARS" \
        org.apache.zookeeper.server.quorum.QuorumPeerMain "$DIR/$name/zoo.cfg" \
        >"$DIR/$name.log" 2>&1 &
    echo $! >"$DIR/$name.pid"
}

running() { # name
    [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

start() {
    install
    mkdir -p "$DIR"
    if running s1; then
        wait_ready "$PORT"
        return
    fi
    rm -rf "$DIR/s1"
    mkdir -p "$DIR/s1/data"
    {
        common_config "$DIR/s1/data" "$PORT"
        if [ -n "${DPRIM_ZK_CONF_EXTRA:-}" ]; then cat "$DPRIM_ZK_CONF_EXTRA"; fi
    } >"$DIR/s1/zoo.cfg"
    launch s1
    wait_ready "$PORT"
    echo "zookeeper ready on 127.0.0.1:$PORT"
}

start_ensemble() {
    install
    mkdir -p "$DIR"
    for i in 1 2 3; do
        if running "z$i"; then kill "$(cat "$DIR/z$i.pid")" 2>/dev/null || true; fi
        rm -rf "$DIR/z$i"
        mkdir -p "$DIR/z$i/data"
        echo "$i" >"$DIR/z$i/data/myid"
        {
            common_config "$DIR/z$i/data" "${i}2181"
            for j in 1 2 3; do echo "server.$j=127.0.0.1:${j}2888:${j}3888"; done
        } >"$DIR/z$i/zoo.cfg"
        launch "z$i"
    done
    for i in 1 2 3; do wait_ready "${i}2181"; done
    echo "zookeeper ensemble ready on 127.0.0.1:12181,22181,32181"
}

restart_member() { # z1 | z2 | z3
    local name=$1 i=${1#z}
    if running "$name"; then
        echo "error: $name is still running" >&2
        return 1
    fi
    launch "$name"
    if ! wait_ready "${i}2181"; then
        # Seen once on a loaded machine: the restarted member never served.
        # Show why, then start it once more before giving up.
        tail -n 20 "$DIR/$name.log" >&2 || true
        kill "$(cat "$DIR/$name.pid")" 2>/dev/null || true
        sleep 1
        launch "$name"
        wait_ready "${i}2181"
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    start-ensemble) start_ensemble ;;
    restart-member) restart_member "${2:?member name (z1, z2 or z3)}" ;;
    stop) stop_servers "$DIR" ;;
    *) echo "usage: $0 install|start|start-ensemble|restart-member zN|stop" >&2; exit 2 ;;
esac
