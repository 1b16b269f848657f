#!/usr/bin/env bash
# Start, stop or inspect the Docker engine that `make images` / `make test-images` use.
#
#   dockerd.sh start    install Debian's docker.io if dockerd is missing, then start
#                       dockerd unless an engine already answers on DOCKER_SOCKET
#   dockerd.sh stop     stop the engine only if this script started it (pid file), then
#                       remove the bridge, iptables rules and mounts it left
#                       (remove-network, remove-mounts); also when that engine was
#                       killed or crashed before (its pid file left behind)
#   dockerd.sh remove-network   remove docker0 and Docker's iptables rules and chains
#                       (not while a dockerd runs in this network namespace: they are its)
#   dockerd.sh remove-mounts    unmount what dockerd mounted under EXEC_ROOT and DATA_ROOT
#                       (not while a dockerd runs)
#   dockerd.sh status   exit 0 when an engine answers
#
# The engine keeps its data under DOCKER_DATA_ROOT (default /var/lib/docker-test,
# outside any clone, so a CI run in a fresh clone still finds the base image and
# the build cache). Every container gets nofile=20000:20000 (RabbitMQ/gunicorn
# friendly, and not the engine's huge default).
set -euo pipefail

DOCKER="${DOCKER:-docker}"
DATA_ROOT="${DOCKER_DATA_ROOT:-/var/lib/docker-test}"
EXEC_ROOT="${DOCKER_EXEC_ROOT:-/run/docker-test}"
SOCKET="${DOCKER_SOCKET:-/var/run/docker.sock}"
PIDFILE="${DOCKERD_PIDFILE:-/run/docker-test.pid}"
LOGFILE="${DOCKERD_LOG:-/var/log/docker-test.log}"

log() { printf '[dockerd] %s\n' "$*" >&2; }

engine_up() { DOCKER_HOST="unix://$SOCKET" "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

ensure_installed() {
  if command -v dockerd >/dev/null && [[ -x /usr/bin/docker || -n "$(command -v docker || true)" ]]; then
    return
  fi
  if [[ $EUID -ne 0 ]]; then log "error: dockerd is not installed and this is not root"; exit 1; fi
  log "installing Debian's docker.io"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the package's init script from starting a system dockerd (default
  # data-root, no ulimit default): this script starts its own below.
  local created_policy=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  apt-get update -q >/dev/null
  apt-get install -y -q docker.io >/dev/null || { [[ -n "$created_policy" ]] && rm -f /usr/sbin/policy-rc.d; exit 1; }
  if [[ -n "$created_policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi
}

start() {
  if engine_up; then
    log "engine already answering on $SOCKET; reusing it"
    return
  fi
  ensure_installed
  if [[ $EUID -ne 0 ]]; then log "error: starting dockerd needs root"; exit 1; fi
  mkdir -p "$DATA_ROOT" "$EXEC_ROOT" "$(dirname "$LOGFILE")"
  # A stale pid file from a killed engine would stop dockerd from starting.
  if [[ -f "$PIDFILE" ]] && ! is_dockerd "$(cat "$PIDFILE")"; then rm -f "$PIDFILE"; fi
  log "starting dockerd (data-root $DATA_ROOT, log $LOGFILE)"
  setsid dockerd \
    --host "unix://$SOCKET" \
    --data-root "$DATA_ROOT" \
    --exec-root "$EXEC_ROOT" \
    --pidfile "$PIDFILE" \
    --default-ulimit nofile=20000:20000 \
    </dev/null >>"$LOGFILE" 2>&1 &
  for _ in $(seq 1 60); do
    if engine_up; then log "engine up: $(DOCKER_HOST="unix://$SOCKET" "$DOCKER" version --format 'server {{.Server.Version}}')"; return; fi
    sleep 1
  done
  log "error: dockerd did not come up in 60 s; last log lines:"
  tail -n 30 "$LOGFILE" >&2
  exit 1
}

# The pid file names a process that is still a dockerd (not one that reused its pid).
is_dockerd() { [[ $(cat "/proc/$1/comm" 2>/dev/null) == dockerd ]]; }

stop() {
  if [[ ! -f "$PIDFILE" ]]; then log "no pid file $PIDFILE: not started by this script, leaving it alone"; return; fi
  pid="$(cat "$PIDFILE")"
  if ! is_dockerd "$pid"; then
    # Killed or crashed: what it left behind is still this script's to remove, unless another
    # engine answers on the socket (then the bridge and rules are its).
    log "not running"
    if engine_up; then
      log "an engine answers on $SOCKET: its network and mounts stay"
    else
      remove_network; remove_mounts
    fi
    rm -f "$PIDFILE"; return
  fi
  log "stopping dockerd (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { log "stopped"; remove_network; remove_mounts; return; }
    sleep 1
  done
  log "error: dockerd (pid $pid) still running after 60 s"; exit 1
}

engine_in_this_netns() {
  local pid ours
  ours=$(readlink /proc/self/ns/net)
  for pid in $(pgrep -x dockerd || true); do
    if [[ $(readlink "/proc/$pid/ns/net" 2>/dev/null) == "$ours" ]]; then return 0; fi
  done
  return 1
}

# dockerd creates the docker0 bridge and its iptables rules and chains (filter and nat),
# and leaves them all behind when it exits.
remove_network() {
  if engine_in_this_netns; then log "a dockerd runs in this network namespace: its network stays"; return; fi
  if command -v iptables >/dev/null; then
    local table rules rule chain args
    for table in filter nat; do
      # The rules that jump to Docker's chains or match its bridge, then the chains themselves
      # (all flushed before any is deleted: they jump to one another).
      rules=$(iptables -t "$table" -S | grep -E '^-A [^ ]+ .*(DOCKER|docker0)' | grep -v '^-A DOCKER' || true)
      while read -r rule; do
        [[ -n $rule ]] || continue
        read -ra args <<<"${rule/#-A /-D }"
        iptables -t "$table" "${args[@]}"
      done <<<"$rules"
      for chain in $(iptables -t "$table" -S | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
        iptables -t "$table" -F "$chain"
      done
      for chain in $(iptables -t "$table" -S | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
        iptables -t "$table" -X "$chain"
      done
    done
  fi
  if ip link show docker0 >/dev/null 2>&1; then ip link delete docker0; fi
  log "removed docker0 and Docker's iptables rules"
}

# dockerd bind-mounts the host's network namespace at EXEC_ROOT/netns/default and its data
# root onto itself, and can leave both mounted when it exits. A data root that is a file
# system of its own (another device than its parent directory) is the user's and stays.
remove_mounts() {
  if pgrep -x dockerd >/dev/null; then log "a dockerd runs: its mounts stay"; return; fi
  local netns="$EXEC_ROOT/netns/default"
  while mountpoint -q "$netns"; do umount "$netns"; done
  while mountpoint -q "$DATA_ROOT" && [[ $(stat -c %d "$DATA_ROOT") == $(stat -c %d "$DATA_ROOT/..") ]]; do
    umount "$DATA_ROOT"
  done
  log "removed dockerd's mounts under $EXEC_ROOT and $DATA_ROOT"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  remove-network) remove_network ;;
  remove-mounts) remove_mounts ;;
  status) engine_up ;;
  *) echo "usage: $0 start|stop|remove-network|remove-mounts|status" >&2; exit 2 ;;
esac
