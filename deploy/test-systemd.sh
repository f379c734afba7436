#!/usr/bin/env bash
# `make test-systemd`: deploy/actorvisor.service under a real systemd.
#
# Boots a Debian tree (debootstrap, cached in $ACTORVISOR_NSPAWN_DIR) with systemd-nspawn,
# installs actorvisor there exactly as docs/systemd.md says (venv in /opt/actorvisor, then
# the unit), then checks what an operator relies on: the unit reaches `active` through
# READY=1, STATUS= follows a VM booting, the unmodified RivetKit quickstart runs against
# it, `actorvisor top` sees the workers, the workers share one cgroup weighing an eighth
# of the supervisor, journald gets levels, a frozen event loop is caught by the watchdog
# and the service restarted, and `systemctl stop` drains within TimeoutStopSec. Opt-in:
# needs root, and downloads Debian packages the first time. Prints PASS/FAIL per check;
# exits non-zero on any FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${ACTORVISOR_NSPAWN_DIR:-/var/tmp/actorvisor-nspawn}
ROOTFS=$WORK/rootfs
SUITE=${ACTORVISOR_NSPAWN_SUITE:-bookworm}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
PORT=${ACTORVISOR_NSPAWN_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT
FAILED=()
NSPAWN_PID=

step() { printf '\n== %s\n' "$*"; }
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILED+=("$*"); }
die() { printf 'ERROR %s\n' "$*" >&2; exit 2; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn)"

step "tools"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v nsenter >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
command -v node >/dev/null || die "node is needed for the quickstart (make test-systemd installs its npm deps)"
systemd-nspawn --version | head -1

# On a cgroup v1 host nspawn mounts the memory, pids and cpu hierarchies read-only in the
# container, so the unit's Delegate=yes cannot hand them to the service as a v1 host's
# systemd does, and the service refuses to run VMs without their limits. They are made
# writable in the container's mounts as soon as it starts (the container's root is this
# process's own cgroup in each), and every cgroup the container made in them is removed
# afterwards. A v2 host delegates through nspawn as it is.
own_cgroup() { awk -F: -v c="$1" '{ n = split($2, a, ","); for (i = 1; i <= n; i++) if (a[i] == c) print $3 }' /proc/self/cgroup; }
CG_DIRS=()   # made writable in the container
CG_SEEN=()   # where the container makes cgroups (also nspawn's own "payload")
if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ]; then
  for controller in memory pids cpu; do
    CG_DIRS+=("$(readlink -f "/sys/fs/cgroup/$controller")$(own_cgroup "$controller" | sed 's:/$::')")
  done
  CG_SEEN=("${CG_DIRS[@]}")
  [ -d /sys/fs/cgroup/systemd ] && CG_SEEN+=("/sys/fs/cgroup/systemd$(own_cgroup name=systemd | sed 's:/$::')")
  [ -d /sys/fs/cgroup/unified ] && CG_SEEN+=("/sys/fs/cgroup/unified$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup | sed 's:/$::')")
fi
cgroups_made() { for d in "${CG_SEEN[@]}"; do find "$d" -mindepth 1 -depth -type d; done; }
# Taken before nspawn first runs: it makes cgroups of its own ("payload", "supervisor").
CG_BEFORE=$(cgroups_made)
cleanup() {
  set +e
  if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    kill -TERM "$NSPAWN_PID" 2>/dev/null || true   # nspawn powers the container off
    for _ in $(seq 100); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$NSPAWN_PID" 2>/dev/null || true
  fi
  # The container's cgroups (its systemd's slices, the service's), deepest first.
  # A cgroup stays busy for a moment after its last process died: try again for 2 s.
  for _ in $(seq 20); do
    left=$(cgroups_made | grep -vxF -e "$CG_BEFORE" -e "")
    [ -n "$left" ] || break
    while read -r dir; do rmdir "$dir" 2>/dev/null; done <<<"$left"
    sleep 0.1
  done
  return 0
}
trap cleanup EXIT

step "Debian tree ($SUITE) in $ROOTFS"
# The container's own packages, then what docs/systemd.md installs (a C compiler for the
# VM's init, mkfs for its disk image, libseccomp for its filter). A cached tree made with
# another list is made again.
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,procps,bubblewrap,gcc,libc6-dev,e2fsprogs,libseccomp2
if [ "$(cat "$ROOTFS/.actorvisor-tree" 2>/dev/null)" != "$PACKAGES" ]; then
  # The host's own Debian mirror, so that no address is written down here.
  mirror=${ACTORVISOR_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || die "no Debian mirror in the host's apt sources; set ACTORVISOR_DEBIAN_MIRROR"
  rm -rf "$ROOTFS.tmp"
  mkdir -p "$WORK"
  debootstrap --variant=minbase \
    --include="$PACKAGES" \
    "$SUITE" "$ROOTFS.tmp" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
  echo actorvisor-test > "$ROOTFS.tmp/etc/hostname"
  # No login prompt on the console we log.
  ln -sf /dev/null "$ROOTFS.tmp/etc/systemd/system/console-getty.service"
  echo "$PACKAGES" > "$ROOTFS.tmp/.actorvisor-tree"
  rm -rf "$ROOTFS"
  mv "$ROOTFS.tmp" "$ROOTFS"
fi
echo "tree ready ($(du -sh "$ROOTFS" | cut -f1))"

step "install actorvisor as docs/systemd.md says"
# Wheels are built on the host (its Python is the same minor version), so the
# container needs no network of its own for Python packages.
rm -rf "$WORK/wheels" && mkdir -p "$WORK/wheels"
"$PYTHON" -m pip wheel -q -w "$WORK/wheels" "$REPO" > "$WORK/wheel.log" 2>&1 \
  || { tail -20 "$WORK/wheel.log"; die "pip wheel failed"; }
rm -rf "$ROOTFS/opt/wheels" && cp -r "$WORK/wheels" "$ROOTFS/opt/wheels"
systemd-nspawn -q --keep-unit --register=no -D "$ROOTFS" --pipe -- /bin/sh -ec '
  [ -x /opt/actorvisor/bin/python ] || python3 -m venv /opt/actorvisor
  /opt/actorvisor/bin/pip install -q --disable-pip-version-check --no-index \
    --find-links /opt/wheels --force-reinstall actorvisor
' > "$WORK/install.log" 2>&1 || { tail -20 "$WORK/install.log"; die "installing into the tree failed"; }
install -D -m 0644 deploy/actorvisor.service "$ROOTFS/etc/systemd/system/actorvisor.service"
install -D -m 0644 deploy/actorvisor.socket "$ROOTFS/etc/systemd/system/actorvisor.socket"
mkdir -p "$ROOTFS/etc/systemd/system/multi-user.target.wants" "$ROOTFS/etc/systemd/system/sockets.target.wants"
ln -sf /etc/systemd/system/actorvisor.service "$ROOTFS/etc/systemd/system/multi-user.target.wants/actorvisor.service"
ln -sf /etc/systemd/system/actorvisor.socket "$ROOTFS/etc/systemd/system/sockets.target.wants/actorvisor.socket"
mkdir -p "$ROOTFS/etc/systemd/system/actorvisor.socket.d"
cat > "$ROOTFS/etc/systemd/system/actorvisor.socket.d/test.conf" <<EOF
[Socket]
ListenStream=
ListenStream=127.0.0.1:$PORT
EOF
# The test's own settings, as an operator's drop-in would be: a free port (the container
# shares the host's network), a slow VM image, and a short watchdog to test it quickly.
mkdir -p "$ROOTFS/etc/systemd/system/actorvisor.service.d"
cat > "$ROOTFS/etc/systemd/system/actorvisor.service.d/test.conf" <<EOF
[Service]
Environment=ACTORVISOR_LISTEN=127.0.0.1:$PORT
Environment=ACTORVISOR_BOOT_DELAY=5
WatchdogSec=4
EOF
rm -rf "$ROOTFS/var/lib/actorvisor" "$ROOTFS/var/lib/private/actorvisor"
echo "installed: $(systemd-nspawn -q --keep-unit --register=no -D "$ROOTFS" --pipe /opt/actorvisor/bin/pip list 2>/dev/null | grep -i '^actorvisor')"

step "boot"
# bwrap --disable-userns writes /proc/sys/user/max_user_namespaces inside each VM's user
# namespace; nspawn mounts /proc/sys read-only unless told otherwise. (On a host, the
# unit leaves /proc/sys alone: see "Deliberately not set" in the unit.)
SYSTEMD_NSPAWN_API_VFS_WRITABLE=1 systemd-nspawn -q --keep-unit --register=no -D "$ROOTFS" \
  --boot --console=read-only > "$WORK/console.log" 2>&1 &
NSPAWN_PID=$!
INIT=
for _ in $(seq 100); do
  # The container's init, not a short-lived helper nspawn forks first.
  INIT=$(pgrep -P "$NSPAWN_PID" -x systemd | head -1 || true)
  [ -n "$INIT" ] && break
  sleep 0.1
done
[ -n "$INIT" ] || { cat "$WORK/console.log"; die "the container did not start"; }
in_ct() { nsenter -t "$INIT" -a -- "$@"; }
if ((${#CG_DIRS[@]})); then
  for _ in $(seq 50); do in_ct mountpoint -q /sys/fs/cgroup/pids && break; sleep 0.05; done
  for controller in memory pids cpu; do in_ct mount -o remount,bind,rw "/sys/fs/cgroup/$controller"; done
fi
# The VMs' disks are loop-mounted (the unit's DeviceAllow=); nspawn's /dev has no loop
# devices, so the container gets the host's, as a host's /dev has them.
for dev in /dev/loop-control /dev/loop[0-9]*; do
  if [ -b "$dev" ]; then stat -c '%n b %t %T' "$dev"; elif [ -c "$dev" ]; then stat -c '%n c %t %T' "$dev"; fi
done | in_ct sh -c 'while read -r name type major minor; do
  [ -e "$name" ] || mknod -m 0660 "$name" "$type" "$((0x$major))" "$((0x$minor))"
done'
state=
for _ in $(seq 300); do
  state=$(in_ct systemctl is-system-running 2>/dev/null || true)
  case $state in running|degraded) break ;; esac
  sleep 0.2
done
echo "container systemd: $(in_ct systemctl --version | head -1); system state: ${state:-unknown}"
prop() { in_ct systemctl show actorvisor -P "$1"; }

step "the unit runs: Type=notify reached active through READY=1"
for _ in $(seq 150); do [ "$(prop ActiveState)" = active ] && break; sleep 0.2; done
in_ct systemctl --no-pager status actorvisor | head -12 || true
check "Type=notify" [ "$(prop Type)" = notify ]
check "active (running)" [ "$(prop ActiveState)/$(prop SubState)" = active/running ]
[ "$(prop ActiveState)" = active ] || in_ct journalctl -u actorvisor -o cat --no-pager -n 30 || true
check "runs as root with a bounded capability set" [ "$(prop User)" = root ] && [ -n "$(prop CapabilityBoundingSet)" ]
check "STATUS= is the one-line summary" grep -q '^actors: none; connections: 0' <<<"$(prop StatusText)"
check "it listens on the socket actorvisor.socket holds (socket activation)" \
  sh -c "nsenter -t $INIT -a -- journalctl -u actorvisor -o cat --no-pager | grep -q '\"socket_activated\": true'"
started=$(date +%s.%N)
in_ct systemctl restart actorvisor
elapsed=$("$PYTHON" -c "print(round($(date +%s.%N) - $started, 2))")
echo "systemctl restart returned after ${elapsed}s (READY=1; VMs boot in 5 s here)"
check "active again after restart" [ "$(prop ActiveState)" = active ]

step "the quickstart (unmodified RivetKit client) through the unit, while STATUS= follows the VM"
(cd tests && ACTORVISOR_URL=$URL ACTORVISOR_KEY=systemd-quickstart timeout 90 node e2e/npm/quickstart.mjs bare) \
  > "$WORK/quickstart.json" 2> "$WORK/quickstart.err" &
QS=$!
saw_booting=no
while kill -0 "$QS" 2>/dev/null; do
  grep -q booting <<<"$(prop StatusText)" && saw_booting=yes
  sleep 0.1
done
wait "$QS" && qs_rc=0 || qs_rc=$?
echo "quickstart exit $qs_rc; $(tail -c 300 "$WORK/quickstart.json")"
check "STATUS= showed the VM booting" [ "$saw_booting" = yes ]
check "quickstart: every event received once, in order, equal to the log; file read back" \
  "$PYTHON" - "$WORK/quickstart.json" <<'EOF'
import json, sys
marker = "ACTORVISOR_RESULT "
r = json.loads(next(l for l in open(sys.argv[1]) if l.startswith(marker))[len(marker):])
c = r["comparison"]
ok = (r["reply"]["stopReason"] == "end_turn" and c["missing"] == [] and c["duplicated"] == 0
      and c["unexpected"] == 0 and c["mismatched"] == 0 and c["inOrder"] and c["received"] == c["logged"] > 0
      and r["file"]["text"] == "quickstart bytes")
print(f"  received {c['received']} of {c['logged']} logged events; file {r['file']['text']!r}")
sys.exit(0 if ok else 1)
EOF
status_has() { for _ in $(seq 50); do grep -q "$1" <<<"$(prop StatusText)" && return 0; sleep 0.1; done; return 1; }
check "STATUS= now says the actor is ready (updated each tick)" status_has '1 ready'


step "actorvisor top --once --json inside the container (the service's pid namespace)"
in_ct /opt/actorvisor/bin/actorvisor top --once --json --url "$URL" > "$WORK/top.json" || true
check "top sees the worker with psutil figures" "$PYTHON" - "$WORK/top.json" <<'EOF'
import json, sys
snap = json.loads(open(sys.argv[1]).read())
actor = next(a for a in snap["actors"] if a["key"] == "systemd-quickstart")
p = actor["process"]
print(f"  supervisor pid {snap['supervisor']['pid']}, worker pid {actor['pid']}, rss {p['rssBytes']}, "
      f"threads {p['threads']}, fds {p['openFiles']}, state {actor['state']}")
sys.exit(0 if snap["processFigures"] and p["pid"] == actor["pid"] and p["rssBytes"] > 0 else 1)
EOF

step "cgroups: the workers share one cgroup beside the VMs', weighing an eighth of the supervisor"
PIDS=$("$PYTHON" -c 'import json, sys; s = json.load(open(sys.argv[1])); a = next(a for a in s["actors"] if a["key"] == "systemd-quickstart"); print(s["supervisor"]["pid"], a["pid"])' "$WORK/top.json" 2>/dev/null || true)
check "the worker is in <service>/actorvisor-*/workers, the supervisor is not, the parent weighs an eighth" \
  in_ct python3 - $PIDS <<'EOF'
import sys
from pathlib import Path

def cpu_dir(pid: str) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return Path("/sys/fs/cgroup/cpu") / path.lstrip("/")
    return Path("/sys/fs/cgroup") / path.lstrip("/")  # v2: the one "0::" line

supervisor, worker = sys.argv[1], sys.argv[2]
workers, own = cpu_dir(worker), cpu_dir(supervisor)
parent = workers.parent
weight = parent / "cpu.shares" if (parent / "cpu.shares").exists() else parent / "cpu.weight"
print(f"  supervisor in {own}, worker in {workers}, {weight.name} {weight.read_text().strip()}")
sys.exit(0 if workers.name == "workers" and parent.name.startswith("actorvisor-")
         and parent not in own.parents and own != parent
         and weight.read_text().strip() in ("128", "12") else 1)
EOF

step "journald: JSON lines with priorities"
in_ct journalctl -u actorvisor -o cat --no-pager | grep '"event"' | tail -3 || true
check "the journal holds the supervisor's and workers' JSON lines" \
  sh -c "nsenter -t $INIT -a -- journalctl -u actorvisor -o cat --no-pager | grep -q '\"event\": \"worker_started\"'"
check "journalctl -p warning leaves info lines out (the <N> prefix became the priority)" \
  sh -c "! nsenter -t $INIT -a -- journalctl -u actorvisor -p warning -o cat --no-pager | grep -q supervisor_listening"
check "nothing logged as <N> text (journald consumed the prefix)" \
  sh -c "! nsenter -t $INIT -a -- journalctl -u actorvisor -o cat --no-pager | grep -q '^<[0-7]>'"

step "watchdog: pings arrive; a frozen event loop gets the service restarted"
w1=$(prop WatchdogTimestampMonotonic); sleep 3; w2=$(prop WatchdogTimestampMonotonic)
check "WATCHDOG=1 keeps arriving (WatchdogTimestamp $w1 -> $w2)" [ "$w2" -gt "$w1" ]
old_pid=$(prop MainPID)
restarts=$(prop NRestarts)
in_ct kill -STOP "$old_pid"   # MainPID is a pid of the container's namespace
for _ in $(seq 300); do
  [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop ActiveState)" = active ] && break
  sleep 0.2
done
check "restarted after a watchdog timeout (NRestarts $restarts -> $(prop NRestarts), pid $old_pid -> $(prop MainPID))" \
  [ "$(prop NRestarts)" -gt "$restarts" -a "$(prop MainPID)" != "$old_pid" ]
in_ct journalctl -u actorvisor -o short --no-pager | grep -iE 'watchdog|Main process exited' | tail -3 || true
check "the aborted process left its threads' stacks in the journal (faulthandler)" \
  sh -c "nsenter -t $INIT -a -- journalctl -u actorvisor -o cat --no-pager | grep -q 'Fatal Python error: Aborted'"
in_ct journalctl -u actorvisor -o cat --no-pager | grep -A4 'Fatal Python error: Aborted' | head -6 || true
check "the actor's history survived the restart" "$PYTHON" - "$URL" <<'EOF'
import asyncio, sys
from protocol.aio import Client
async def main():
    async with Client(sys.argv[1]) as client:
        page = await client.action("vm", "systemd-quickstart", "replayEvents", {"after": 0})
        names = {e["name"] for e in page["events"]}
        print(f"  {len(page['events'])} events replayed: {sorted(names)}")
        return "sessionEvent" in names
sys.exit(0 if asyncio.run(main()) else 1)
EOF

step "systemctl stop drains within TimeoutStopSec"
"$REPO/.venv/bin/actorvisor" call --url "$URL" draining exec '"true"' > /dev/null \
  || fail "an action before stopping"
started=$(date +%s.%N)
in_ct systemctl stop actorvisor
elapsed=$("$PYTHON" -c "print(round($(date +%s.%N) - $started, 2))")
echo "stopped in ${elapsed}s (TimeoutStopSec=$(prop TimeoutStopUSec))"
check "stop result: success (no SIGKILL from systemd)" [ "$(prop Result)" = success ]
check "the journal shows the drain" \
  sh -c "nsenter -t $INIT -a -- journalctl -u actorvisor -o cat --no-pager | grep -q supervisor_stopped"
check "nothing left in the unit's cgroup" [ "$(in_ct systemctl show actorvisor -P TasksCurrent)" = "[not set]" -o "$(in_ct systemctl show actorvisor -P TasksCurrent)" = 0 ]

step "hardening"
in_ct systemd-analyze security actorvisor --no-pager 2>/dev/null | tail -1 || true

step "result"
if ((${#FAILED[@]})); then
  printf '%d check(s) failed:\n' "${#FAILED[@]}"; printf '  %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all checks passed"
