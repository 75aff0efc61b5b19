#!/usr/bin/env bash
# The README's main command: one-tproxy end to end on a throw-away topology.
#
#   bash scripts/demo.sh            # build, show, tear down; last line demo: SUCCESS / FAILED
#   bash scripts/demo.sh --keep     # (or KEEP=1) leave the topology up to explore it
#   bash scripts/demo.sh --down     # tear down a topology left by --keep
#
# As root. It installs what it needs (scripts/setup.sh), then builds, inside the
# machine but isolated from its network:
#   - a simulated hypervisor: network namespace "tproxy-demo-hv" with bridge "demobr0",
#     a sample "OneGate" HTTP service on 127.0.0.1:5030 and a custom service on
#     127.0.0.1:8080 (both on the hypervisor's loopback only);
#   - two guest VMs: namespaces "tproxy-demo-vm1" and "tproxy-demo-vm2" on demobr0,
#     addresses 169.254.10.1 and .2 (link-local, as an isolated network would have);
#   - a configuration file like DESIGN.md 2.1; then `one-tproxy up demobr0`.
# Every command that acts "on the hypervisor" runs inside its namespace with
# `nsenter --net=/run/netns/tproxy-demo-hv`, so the machine's own network is never
# changed; all traffic stays inside these namespaces.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

HV=tproxy-demo-hv
BR=demobr0
VM1=tproxy-demo-vm1
VM2=tproxy-demo-vm2
NS=one_tproxy_$BR
STATE=/run/one-tproxy-demo          # remembers the work dir of a --keep run
KEEP=${KEEP:-0}
MODE=run
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        --down) MODE=down ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

if [ -t 1 ]; then B=$'\e[1m'; G=$'\e[32m'; R=$'\e[31m'; D=$'\e[2m'; N=$'\e[0m'; else B= G= R= D= N=; fi
STEP=0
step() { STEP=$((STEP + 1)); echo; echo "${B}==> [$STEP] $*${N}"; }
info() { echo "    $*"; }
# show WHERE CMD...: print the command as an administrator would type it there, run it.
show() {
    local where=$1; shift
    echo "${D}${where}#${N} $*"
    case "$where" in
        host) "$@" 9>&- ;;
        *) nsenter --net="/run/netns/$where" -- "$@" 9>&- ;;
    esac
}
# (9>&-: the demo's lock stays with the demo, not with the daemons it starts)
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" -- "$@" 9>&-; }
fail() { echo "${R}demo: step $STEP failed: $*${N}" >&2; FAILED=1; exit 1; }

# Guests talk to 169.254.16.9 directly: no HTTP proxy from the caller's environment.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: must run as root (it builds network namespaces and nftables state)" >&2
    echo "demo: FAILED"
    exit 1
fi

# One demo at a time: two would tear down each other's topology.
exec 9>/run/one-tproxy-demo.lock
if ! flock -n 9; then
    echo "demo: another demo is running (lock /run/one-tproxy-demo.lock)" >&2
    echo "demo: FAILED"
    exit 1
fi

SERVICE_PIDS=()

# ---------------------------------------------------------------- teardown
pids_in_ns() {  # PIDs of every process whose network namespace is /run/netns/$1
    local target ino pid
    target=$(stat -L -c %i "/run/netns/$1" 2>/dev/null) || return 0
    for pid in /proc/[0-9]*; do
        ino=$(stat -L -c %i "$pid/ns/net" 2>/dev/null) || continue
        [ "$ino" = "$target" ] && echo "${pid#/proc/}"
    done
}
teardown() {
    local quiet=${1:-} ns pids
    [ -n "$quiet" ] || step "tear down the topology"
    if [ -e "/run/netns/$HV" ]; then
        if [ -x "$REPO/.venv/bin/one-tproxy" ] && [ -n "${WORK:-}" ]; then
            in_ns "$HV" timeout 30 "$REPO/.venv/bin/one-tproxy" down "$BR" >/dev/null 2>&1 || true
            in_ns "$HV" timeout 30 "$REPO/.venv/bin/one-tproxy" stop >/dev/null 2>&1 || true
        fi
    fi
    # The services the demo started, by PID; then whatever still lives in the demo's
    # namespaces, which is the demo's own too (proxies).
    [ "${#SERVICE_PIDS[@]}" -gt 0 ] && kill "${SERVICE_PIDS[@]}" 2>/dev/null
    for ns in "$VM1" "$VM2" "$NS" "$HV"; do
        pids=$(pids_in_ns "$ns")
        [ -n "$pids" ] && kill $pids 2>/dev/null
    done
    sleep 0.3
    for ns in "$VM1" "$VM2" "$NS" "$HV"; do
        pids=$(pids_in_ns "$ns")
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null
        [ -e "/run/netns/$ns" ] && ip netns delete "$ns" 2>/dev/null
    done
    rm -f "$STATE"
    [ -n "$quiet" ] && return 0
    local left=""
    for ns in "$VM1" "$VM2" "$NS" "$HV"; do [ -e "/run/netns/$ns" ] && left="$left $ns"; done
    if [ -n "$left" ]; then
        echo "${R}    left behind:$left${N}"; return 1
    fi
    info "namespaces $HV, $VM1, $VM2 and $NS deleted (with their links and nft tables);"
    info "no demo process is left."
}

if [ "$MODE" = down ]; then
    WORK=$(cat "$STATE" 2>/dev/null || true)
    if [ -n "$WORK" ]; then
        export ONE_TPROXY_CONFIG=$WORK/OpenNebulaNetwork.conf ONE_TPROXY_LOG_DIR=$WORK/log \
            ONE_TPROXY_RUN_DIR=$WORK/run
    fi
    teardown && echo "demo: topology removed${WORK:+ (logs kept in $WORK/log)}"
    exit $?
fi

FAILED=0
FINISHED=0
WORK=""
finish() {
    local rc=$?
    trap - EXIT
    trap '' INT TERM   # the teardown itself must not be cut short by a second Ctrl-C
    [ "$FINISHED" = 1 ] && exit "$rc"
    FINISHED=1
    if [ "$KEEP" = 1 ] && [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then
        echo "$WORK" > "$STATE"
        step "topology kept up for exploring (--keep)"
        info "enter the hypervisor:  nsenter --net=/run/netns/$HV bash"
        info "enter a guest:         nsenter --net=/run/netns/$VM1 bash"
        info "   then e.g.           curl http://169.254.16.9:5030/"
        info "the mesh's commands:   nsenter --net=/run/netns/$HV env ONE_TPROXY_CONFIG=$WORK/OpenNebulaNetwork.conf \\"
        info "                         ONE_TPROXY_LOG_DIR=$WORK/log ONE_TPROXY_RUN_DIR=$WORK/run .venv/bin/one-tproxy status"
        info "logs:                  $WORK/log"
        info "remove it all:         bash scripts/demo.sh --down"
        echo
        echo "${G}${B}demo: SUCCESS${N} (topology kept)"
        exit 0
    fi
    teardown || rc=1
    if [ -n "$WORK" ]; then
        step "logs"
        info "the proxies' logs were in $WORK/log (kept):"
        ls -l "$WORK/log" 2>/dev/null | sed 's/^/      /'
    fi
    echo
    if [ "$rc" = 0 ] && [ "$FAILED" = 0 ]; then
        echo "${G}${B}demo: SUCCESS${N}"
        exit 0
    fi
    echo "${R}${B}demo: FAILED${N}"
    exit 1
}
interrupted() { echo; echo "${R}demo: interrupted${N}" >&2; KEEP=0; FAILED=1; exit 130; }
trap finish EXIT
trap interrupted INT TERM

# ---------------------------------------------------------------- 1. install
step "install what the demo needs (scripts/setup.sh)"
bash scripts/setup.sh || fail "setup failed"
PY=$REPO/.venv/bin/python
[ -x "$REPO/.venv/bin/one-tproxy" ] || fail "$REPO/.venv/bin/one-tproxy is missing"
export PATH="$REPO/.venv/bin:$PATH"
OT=one-tproxy
info "$(one-tproxy --version 2>&1) from $REPO/.venv/bin"

# A previous run that was killed hard may have left the demo's own names behind.
teardown quiet

WORK=$(mktemp -d /tmp/one-tproxy-demo.XXXXXX)
mkdir -p "$WORK/log" "$WORK/run" "$WORK/onegate" "$WORK/custom"
export ONE_TPROXY_CONFIG=$WORK/OpenNebulaNetwork.conf
export ONE_TPROXY_LOG_DIR=$WORK/log
export ONE_TPROXY_RUN_DIR=$WORK/run

# ---------------------------------------------------------------- 2. topology
step "build a throw-away hypervisor: namespace $HV with bridge $BR"
ip netns add "$HV" || fail "cannot create namespace $HV"
in_ns "$HV" ip link set lo up
show "$HV" ip link add "$BR" type bridge || fail "bridge"
show "$HV" ip link set "$BR" up || fail "bridge up"

step "plug two guest VMs into $BR (namespaces $VM1, $VM2)"
i=0
for vm in "$VM1" "$VM2"; do
    i=$((i + 1))
    ip netns add "$vm" || fail "cannot create namespace $vm"
    in_ns "$vm" ip link set lo up
    in_ns "$HV" ip link add "vnet$i" type veth peer name eth0 netns "$vm" || fail "veth"
    in_ns "$HV" ip link set "vnet$i" master "$BR" up
    in_ns "$vm" ip address add "169.254.10.$i/16" dev eth0
    in_ns "$vm" ip link set eth0 up
    info "$vm: eth0 169.254.10.$i/16, port vnet$i of $BR"
done

step "start the services on the hypervisor's loopback"
cat > "$WORK/onegate/index.html" <<'EOF'
{"service": "OneGate (demo)", "message": "hello from the front-end, through one-tproxy"}
EOF
echo "custom service (demo): you reached 127.0.0.1:8080 of the hypervisor" > "$WORK/custom/index.html"
# nsenter execs the service, so $! is the service's own PID.
nsenter --net="/run/netns/$HV" -- "$PY" tests/integration/services.py http \
    --bind 127.0.0.1 --port 5030 --dir "$WORK/onegate" >/dev/null 2>&1 9>&- &
SERVICE_PIDS+=($!)
nsenter --net="/run/netns/$HV" -- "$PY" tests/integration/services.py http \
    --bind 127.0.0.1 --port 8080 --dir "$WORK/custom" >/dev/null 2>&1 9>&- &
SERVICE_PIDS+=($!)
for port in 5030 8080; do
    for _ in $(seq 100); do
        in_ns "$HV" curl -s -o /dev/null "http://127.0.0.1:$port/" && break
        sleep 0.05
    done
    in_ns "$HV" curl -s -o /dev/null "http://127.0.0.1:$port/" \
        || fail "service on 127.0.0.1:$port did not start"
done
info "\"OneGate\" on 127.0.0.1:5030, a custom service on 127.0.0.1:8080 (in $HV only)"

# ---------------------------------------------------------------- 3. config + up
step "write the configuration ($ONE_TPROXY_CONFIG)"
cat > "$ONE_TPROXY_CONFIG" <<'EOF'
# The tproxy part of OpenNebulaNetwork.conf (DESIGN.md 2.1).
:tproxy_debug_level: 3 # 0 = ERROR, 1 = WARNING, 2 = INFO, 3 = DEBUG
:tproxy:
# OneGate service (here on the hypervisor's loopback; normally the front-end VIP).
- :service_port: 5030
  :remote_addr: 127.0.0.1
  :remote_port: 5030
# Custom service, only for the network "demo-net".
- :service_port: 1234
  :remote_addr: 127.0.0.1
  :remote_port: 8080
  :networks: [demo-net, 7]
# Only for another network: must NOT appear on this bridge.
- :service_port: 4321
  :remote_addr: 127.0.0.1
  :remote_port: 8080
  :networks: [other-net]
EOF
sed 's/^/      /' "$ONE_TPROXY_CONFIG"
show "$HV" "$OT" endpoints --network demo-net || fail "endpoints"

step "one-tproxy up $BR --network demo-net   (what OpenNebula's network driver runs)"
show "$HV" "$OT" up "$BR" --network demo-net -v || fail "one-tproxy up failed"

# ---------------------------------------------------------------- 4. look around
step "one-tproxy status"
for _ in $(seq 50); do
    in_ns "$HV" "$OT" status 2>/dev/null | grep -q "^$NS: " && break
    sleep 0.1
done
show "$HV" "$OT" status || fail "status says the root proxy is not running"
in_ns "$HV" "$OT" status | grep -q "^$NS: [0-9]" || fail "no inner proxy for $BR"

step "nftables on the hypervisor (nft list ruleset)"
show "$HV" nft list ruleset || fail "nft"
in_ns "$HV" nft list map ip one_tproxy "ep_$BR" >/dev/null 2>&1 || fail "map ep_$BR is missing"
if in_ns "$HV" nft list ruleset | grep -q "4321 :"; then fail "port 4321 (other-net only) is in the map"; fi

step "ip netns list"
show host ip netns list | grep -E "^($NS|$HV|$VM1|$VM2)\b" || fail "namespaces"

step "the namespace $NS: addresses and routes"
show "$NS" ip -4 address show || fail "ip address"
show "$NS" ip route show || fail "ip route"
show "$HV" ip -br link show master "$BR"

# ---------------------------------------------------------------- 5. guests
step "guests fetch http://169.254.16.9:5030/ (OneGate)"
for vm in "$VM1" "$VM2"; do
    out=$(show "$vm" curl -sS --max-time 10 http://169.254.16.9:5030/) \
        || fail "$vm could not fetch OneGate: $out"
    echo "$out"
    grep -q OneGate <<<"$out" || fail "unexpected answer from OneGate"
done

step "a guest fetches the custom service at http://169.254.16.9:1234/"
out=$(show "$VM1" curl -sS --max-time 10 http://169.254.16.9:1234/) \
    || fail "custom service: $out"
echo "$out"
grep -q "custom service" <<<"$out" || fail "unexpected answer from the custom service"

step "port 4321 belongs to another network: refused here"
if out=$(show "$VM1" curl -sS --max-time 5 http://169.254.16.9:4321/ 2>&1); then
    fail "port 4321 answered: $out"
fi
echo "$out"
info "(as expected: no listener for 4321 on this bridge)"

step "the guests cannot reach the hypervisor's own network: 127.0.0.1:5030 is theirs, not the host's"
if out=$(show "$VM1" curl -sS --max-time 3 http://127.0.0.1:5030/ 2>&1); then
    fail "the guest reached 127.0.0.1:5030: $out"
fi
echo "$out"

step "what the proxies logged (level 3 = DEBUG: every connection)"
for log in one_tproxy "one_tproxy_$BR"; do
    info "$ONE_TPROXY_LOG_DIR/$log.log, last lines:"
    tail -n 6 "$ONE_TPROXY_LOG_DIR/$log.log" 2>/dev/null | sed 's/^/      /'
done

if [ "$KEEP" != 1 ]; then
    step "one-tproxy down $BR   (the last VM of the network left this host)"
    show "$HV" "$OT" down "$BR" -v || fail "one-tproxy down failed"
    for _ in $(seq 50); do [ -e "/run/netns/$NS" ] || break; sleep 0.1; done
    [ -e "/run/netns/$NS" ] && fail "$NS still exists after down"
    for _ in $(seq 50); do
        in_ns "$HV" "$OT" status >/dev/null 2>&1
        [ $? = 3 ] && break
        sleep 0.1
    done
    show "$HV" "$OT" status
    rc=$?
    info "(exit status $rc: 3 means no root proxy runs - with no bridge left, the mesh exits)"
    [ "$rc" = 3 ] || fail "the mesh still runs with no bridge left"
fi
exit 0
