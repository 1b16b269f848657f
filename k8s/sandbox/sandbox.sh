#!/usr/bin/env bash
# A real single-node Kubernetes on this machine, from binaries built by k8s/sandbox/tools/build.sh.
#
#   sandbox.sh up       start (idempotent): etcd, kube-apiserver, controller-manager, scheduler,
#                       containerd + kubelet, kube-proxy, a local registry, then the add-ons
#   sandbox.sh down     stop everything and leave nothing behind (processes, mounts, netns,
#                       interfaces, iptables/nftables rules, state)
#   sandbox.sh status   what runs
#   sandbox.sh leftovers  list anything `down` should have removed (exit 1 if any)
#
# Addresses and names: k8s/sandbox/CONVENTIONS.md. Needs root (it runs a kubelet).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$REPO/k8s/sandbox"
STATE=${SANDBOX_STATE:-/var/lib/jobs-sandbox}
RUN=${SANDBOX_RUN:-/run/jobs-sandbox}
LOGS=${SANDBOX_LOGS:-/var/log/jobs-sandbox}
KUBECONFIG_OUT="$REPO/.sandbox/kubeconfig"
CONTEXT=jobs-sandbox
NODE=sandbox
NODE_IP=10.250.0.1
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_IP=10.96.0.10
BRIDGE=sbx0
NODE_IF=sbx-node
REGISTRY_ADDR=127.0.0.1:5000
CONTAINERD_SOCK="$RUN/containerd/containerd.sock"
PKI="$STATE/pki"
# Components in start order; `down` stops them in reverse.
COMPONENTS=(registry etcd kube-apiserver containerd kube-controller-manager kube-scheduler kubelet kube-proxy)

log() { printf '[sandbox] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ helpers
pidfile() { echo "$RUN/$1.pid"; }
running() { local p; p=$(pidfile "$1"); [[ -f $p ]] && kill -0 "$(cat "$p")" 2>/dev/null; }

# fail_component NAME WHY: name it, show its log tail, clean up, exit non-zero.
fail_component() {
  log "component '$1' failed: $2"
  if [[ -f "$LOGS/$1.log" ]]; then
    log "last lines of $LOGS/$1.log:"
    tail -n 25 "$LOGS/$1.log" >&2 || true
  fi
  if [[ "${SANDBOX_KEEP_ON_FAILURE:-}" != 1 ]]; then
    log "cleaning up (SANDBOX_KEEP_ON_FAILURE=1 keeps the failed sandbox for inspection)"
    down >/dev/null 2>&1 || true
  fi
  exit 1
}

# start NAME CMD...: run CMD in the background (own session), log to $LOGS/NAME.log.
start() {
  local name=$1; shift
  if running "$name"; then log "$name already running"; return; fi
  log "starting $name"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
}

# wait_until NAME SECONDS CMD...: poll CMD; fail NAME if it dies or the time runs out.
wait_until() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    running "$name" || fail_component "$name" "process exited"
    ((SECONDS < deadline)) || fail_component "$name" "not ready after ${secs}s"
    sleep 1
  done
  # A check can pass against someone else's process on the same port: ours must still be alive.
  sleep 0.5
  running "$name" || fail_component "$name" "process exited (is its port taken by another process?)"
}

# write FILE < content: replace FILE only when the content changes (kube-proxy exits when its
# config file changes, and `up` must be idempotent).
write() {
  local tmp; tmp=$(mktemp "$1.XXXX")
  cat >"$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

kubectl_() { "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" "$@"; }

# ------------------------------------------------------------------ prerequisites
ensure_packages() {
  local need=()
  command -v containerd >/dev/null || need+=(containerd)
  command -v runc >/dev/null || need+=(runc)
  [[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
  command -v iptables >/dev/null || need+=(iptables)
  command -v conntrack >/dev/null || need+=(conntrack)
  command -v docker-registry >/dev/null || need+=(docker-registry)
  command -v openssl >/dev/null || need+=(openssl)
  command -v nft >/dev/null || need+=(nftables)
  command -v ipset >/dev/null || need+=(ipset)
  command -v ip >/dev/null || need+=(iproute2)
  if ((${#need[@]})); then
    log "installing Debian packages: ${need[*]}"
    # The packages' init scripts must not start system-wide daemons: this script runs its own.
    local policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
    if [[ -n $policy ]]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
}

ensure_kernel() {
  modprobe br_netfilter 2>/dev/null || true
  modprobe overlay 2>/dev/null || true
  [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || die "br_netfilter is not loaded (needed for Services on the pod bridge)"
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
  swapon --show=NAME --noheadings 2>/dev/null | grep -q . && log "swap is on: the kubelet is told to tolerate it"
  return 0
}

tools() {
  TOOLS_K8S=$("$HERE/tools/build.sh" kubernetes)
  KUBECTL=${KUBECTL:-$(command -v kubectl || true)}
  [[ -n $KUBECTL ]] || KUBECTL="$REPO/.tools/k8s/bin/kubectl"
  [[ -x $KUBECTL ]] || (cd "$REPO" && make --no-print-directory k8s-tools >/dev/null)
}

# ------------------------------------------------------------------ PKI and kubeconfigs
cert() { # cert NAME SUBJECT [SANS] [CA]: key + certificate signed by CA (default: ca)
  local name=$1 subj=$2 sans=${3:-} ca=${4:-ca}
  [[ -f "$PKI/$name.crt" ]] && return
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  local ext="$PKI/$name.ext"
  { echo "basicConstraints=CA:FALSE"; echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n $sans ]]; then echo "extendedKeyUsage=serverAuth,clientAuth"; echo "subjectAltName=$sans"
    else echo "extendedKeyUsage=clientAuth"; fi; } >"$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

ca() { # ca NAME CN
  [[ -f "$PKI/$1.crt" ]] && return
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -out "$PKI/$1.crt" -days 365 \
    -subj "/CN=$2" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

kubeconfig() { # kubeconfig FILE CERTNAME SERVER
  local file=$1 name=$2 server=${3:-https://$NODE_IP:6443}
  write "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $CONTEXT
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$name.crt")
    client-key-data: $(base64 -w0 <"$PKI/$name.key")
contexts:
- name: $CONTEXT
  context: {cluster: $CONTEXT, user: $name}
current-context: $CONTEXT
EOF
  chmod 600 "$file"
}

pki() {
  mkdir -p "$PKI"; chmod 700 "$PKI"
  ca ca sandbox-ca
  ca front-proxy-ca sandbox-front-proxy-ca
  cert apiserver "/CN=kube-apiserver" \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert front-proxy-client "/CN=front-proxy-client" "" front-proxy-ca
  cert admin "/O=system:masters/CN=sandbox-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kubelet "/O=system:nodes/CN=system:node:$NODE"
  cert kubelet-serving "/CN=$NODE" "DNS:$NODE,IP:$NODE_IP,IP:127.0.0.1"
  cert kube-proxy "/CN=system:kube-proxy"
  [[ -f "$PKI/sa.key" ]] || { openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null; openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null; }
  for n in admin controller-manager scheduler kubelet kube-proxy; do kubeconfig "$STATE/$n.kubeconfig" "$n"; done
  mkdir -p "$(dirname "$KUBECONFIG_OUT")"
  kubeconfig "$KUBECONFIG_OUT" admin
}

# ------------------------------------------------------------------ network
network() {
  if ! ip link show "$NODE_IF" >/dev/null 2>&1; then
    # No dummy module on this VM: an empty bridge holds the node address just as well.
    ip link add "$NODE_IF" type bridge
    ip addr add "$NODE_IP/32" dev "$NODE_IF"
    ip link set "$NODE_IF" up
  fi
  mkdir -p "$STATE/cni/net.d"
  write "$STATE/cni/net.d/10-sandbox.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sandbox",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "$STATE/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "firewall", "backend": "iptables"},
    {"type": "loopback"}
  ]
}
EOF
}

# ------------------------------------------------------------------ components
start_registry() {
  if ! running registry && ss -ltn "sport = :${REGISTRY_ADDR##*:}" | grep -q LISTEN; then
    fail_component registry "port ${REGISTRY_ADDR##*:} is taken by another process: $(ss -ltnpH "sport = :${REGISTRY_ADDR##*:}" | grep -o 'users:.*')"
  fi
  mkdir -p "$STATE/registry"
  write "$STATE/registry.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $STATE/registry}
  delete: {enabled: true}
http: {addr: $REGISTRY_ADDR}
EOF
  start registry docker-registry serve "$STATE/registry.yml"
  wait_until registry 30 curl -fsS "http://$REGISTRY_ADDR/v2/"
}

start_etcd() {
  start etcd "$TOOLS_K8S/etcd" --name sandbox --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster sandbox=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
    --quota-backend-bytes 2147483648 --snapshot-count 10000
  wait_until etcd 60 curl -fsS http://127.0.0.1:2381/health
}

start_apiserver() {
  start kube-apiserver "$TOOLS_K8S/kube-apiserver" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port 6443 \
    --etcd-servers http://127.0.0.1:2379 \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --requestheader-client-ca-file "$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-extra-headers-prefix X-Remote-Extra- --requestheader-group-headers X-Remote-Group \
    --requestheader-username-headers X-Remote-User \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --allow-privileged=true --event-ttl 1h
  wait_until kube-apiserver 120 kubectl_ get --raw /readyz
}

start_containerd() {
  mkdir -p "$STATE/containerd" "$RUN/containerd" "$STATE/certs.d/localhost:5000"
  write "$STATE/certs.d/localhost:5000/hosts.toml" <<EOF
server = "http://localhost:5000"
[host."http://$REGISTRY_ADDR"]
  capabilities = ["pull", "resolve", "push"]
  skip_verify = true
EOF
  write "$STATE/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd"
state = "$RUN/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$RUN/containerd/containerd.sock.ttrpc"
[debug]
  address = "$RUN/containerd/debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost:5000/sandbox/pause:3.10"
  enable_unprivileged_ports = false
  # This machine withholds CAP_SYS_RESOURCE even from root, so no process may lower its OOM score
  # (the pause container asks for -998): keep every container's score at or above containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$STATE/certs.d"
EOF
  start containerd containerd --config "$STATE/containerd.toml"
  wait_until containerd 60 test -S "$CONTAINERD_SOCK"
}

start_controller_manager() {
  start kube-controller-manager "$TOOLS_K8S/kube-controller-manager" \
    --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10257 \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --root-ca-file "$PKI/ca.crt" --service-account-private-key-file "$PKI/sa.key" \
    --use-service-account-credentials=true --leader-elect=false \
    --service-cluster-ip-range "$SERVICE_CIDR" --cluster-cidr "$POD_CIDR" --allocate-node-cidrs=false \
    --horizontal-pod-autoscaler-sync-period 15s
  wait_until kube-controller-manager 60 curl -fsSk https://127.0.0.1:10257/healthz
}

start_scheduler() {
  start kube-scheduler "$TOOLS_K8S/kube-scheduler" \
    --kubeconfig "$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false
  wait_until kube-scheduler 60 curl -fsSk https://127.0.0.1:10259/healthz
}

start_kubelet() {
  mkdir -p "$STATE/kubelet" "$STATE/pod-logs"
  write "$STATE/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
podLogsDir: $STATE/pod-logs
failSwapOn: false
# No CAP_SYS_RESOURCE here (see containerd's restrict_oom_score_adj): the kubelet keeps its score.
oomScoreAdj: 0
maxPods: 110
serializeImagePulls: false
# A development machine: keep evicting only on a truly full disk.
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%}
imageGCHighThresholdPercent: 98
imageGCLowThresholdPercent: 95
# cgroup v1 (this VM): supported by 1.34 in maintenance mode.
failCgroupV1: false
shutdownGracePeriod: 0s
EOF
  start kubelet "$TOOLS_K8S/kubelet" --config "$STATE/kubelet-config.yaml" \
    --kubeconfig "$STATE/kubelet.kubeconfig" --root-dir "$STATE/kubelet" \
    --hostname-override "$NODE" --node-ip "$NODE_IP" --v 1
  wait_until kubelet 90 curl -fsS http://127.0.0.1:10248/healthz
}

start_kube_proxy() {
  write "$STATE/kube-proxy-config.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $NODE
clusterCIDR: $POD_CIDR
mode: iptables
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0}
EOF
  start kube-proxy "$TOOLS_K8S/kube-proxy" --config "$STATE/kube-proxy-config.yaml"
  wait_until kube-proxy 60 curl -fsS http://127.0.0.1:10256/healthz
}

cluster_objects() {
  # The API server's kubelet client (exec, logs, port-forward) and the registry advertisement.
  kubectl_ apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: sandbox-apiserver-kubelet}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:kubelet-api-admin}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: local-registry-hosting, namespace: kube-public}
data:
  localRegistryHosting.v1: |
    host: "localhost:5000"
    hostFromContainerRuntime: "localhost:5000"
    help: "https://github.com/kubernetes/enhancements/tree/master/keps/sig-cluster-lifecycle/generic/1755-communicating-a-local-registry"
EOF
}

skaffold_config() { # skaffold_config set|unset: Skaffold pushes to the sandbox registry for this context
  local skaffold
  skaffold=$("$HERE/tools/build.sh" skaffold 2>/dev/null)/skaffold || return 0
  [[ -x $skaffold ]] || return 0
  if [[ $1 == set ]]; then
    "$skaffold" config set --kube-context "$CONTEXT" default-repo localhost:5000 >/dev/null
  else
    "$skaffold" config unset --kube-context "$CONTEXT" default-repo >/dev/null 2>&1 || true
  fi
}

wait_node_ready() {
  local deadline=$((SECONDS + 120))
  until [[ "$(kubectl_ get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; do
    ((SECONDS < deadline)) || fail_component kubelet "node $NODE not Ready after 120s"
    sleep 2
  done
}

addons() {
  # Images for the pause container and the add-ons, then the add-ons themselves.
  REGISTRY=localhost:5000 "$HERE/images/build.sh" >&2 || fail_component images "building the sandbox images failed"
  log "applying add-ons (k8s/sandbox/addons)"
  kubectl_ apply --server-side --force-conflicts -k "$HERE/addons" >/dev/null \
    || fail_component addons "kubectl apply -k k8s/sandbox/addons failed"
  # The Prometheus is a custom resource: its CRD must be established before it can be applied.
  kubectl_ wait --for=condition=Established crd/prometheuses.monitoring.coreos.com --timeout=60s >/dev/null \
    || fail_component addons "the Prometheus Operator's CRDs were not established"
  kubectl_ apply --server-side --force-conflicts -k "$HERE/addons/prometheus" >/dev/null \
    || fail_component addons "kubectl apply -k k8s/sandbox/addons/prometheus failed"
  if ! kubectl_ wait --for=condition=Available deploy -A -l sandbox.jobs/addon --timeout=300s >/dev/null \
     || ! kubectl_ rollout status daemonset -n kube-system -l sandbox.jobs/addon --timeout=120s >/dev/null; then
    kubectl_ get pods -A -o wide >&2
    fail_component addons "add-ons not ready"
  fi
}

up() {
  [[ $EUID -eq 0 ]] || die "the sandbox runs a kubelet: run as root"
  mkdir -p "$STATE" "$RUN" "$LOGS"
  ensure_packages
  ensure_kernel
  tools
  pki
  network
  start_registry
  start_etcd
  start_apiserver
  start_containerd
  start_controller_manager
  start_scheduler
  start_kubelet
  start_kube_proxy
  cluster_objects
  skaffold_config set
  wait_node_ready
  addons
  log "ready: export KUBECONFIG=$KUBECONFIG_OUT (context $CONTEXT)"
}

# ------------------------------------------------------------------ teardown
stop_component() {
  local p; p=$(pidfile "$1")
  [[ -f $p ]] || return 0
  local pid; pid=$(cat "$p")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$p"
}

kill_pods() {
  # Every container of this containerd: its shims (and so their containers' processes).
  local pids
  pids=$(pgrep -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" || true)
  for pid in $pids; do
    # the shim's children are the pods' processes
    pkill -KILL -P "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Processes still in the kubelet's pod cgroups (containers whose shim already died).
  local c
  for c in /sys/fs/cgroup/*/kubepods; do
    [[ -d $c ]] || continue
    find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  sleep 0.5
  for c in /sys/fs/cgroup/*/kubepods; do
    [[ -d $c ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}

unmount_under() {
  local dir
  for dir in "$@"; do
    grep -F " $dir" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  done
}

clean_netns() {
  local ns
  for ns in /var/run/netns/cni-*; do
    [[ -e $ns ]] || continue
    umount -l "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
}

clean_iptables() {
  # Rules and chains of the kubelet, kube-proxy and the CNI plugins (KUBE-*, CNI-*); nobody else's.
  local ipt table
  for ipt in iptables ip6tables; do
    command -v $ipt >/dev/null || continue
    for table in filter nat mangle raw; do
      $ipt-save -t $table 2>/dev/null | grep -E '^-A ' | grep -E -- '-j (KUBE-|CNI-)|^-A (KUBE-|CNI-)|sandbox|10\.244\.0\.' \
        | grep -vE '^-A (KUBE-|CNI-)' | sed 's/^-A /-D /' | while read -r rule; do
          eval "$ipt -t $table $rule" 2>/dev/null || true
        done
      for chain in $($ipt-save -t $table 2>/dev/null | awk '/^:(KUBE-|CNI-)/ {print substr($1,2)}'); do
        $ipt -t $table -F "$chain" 2>/dev/null || true
      done
      for chain in $($ipt-save -t $table 2>/dev/null | awk '/^:(KUBE-|CNI-)/ {print substr($1,2)}'); do
        $ipt -t $table -X "$chain" 2>/dev/null || true
      done
    done
  done
  # kube-router's ipsets (NetworkPolicy members), once no rule refers to them.
  if command -v ipset >/dev/null; then
    ipset list -n 2>/dev/null | grep -E '^(inet6:)?KUBE-' | xargs -r -n1 ipset destroy 2>/dev/null || true
  fi
  if command -v nft >/dev/null; then
    nft list tables 2>/dev/null | awk '{print $2, $3}' | while read -r fam name; do
      case $name in kube-proxy|kube-network-policies|kubernetes*) nft delete table "$fam" "$name" 2>/dev/null || true ;; esac
    done
  fi
}

down() {
  # Best effort: every step runs even when an earlier one finds nothing to do.
  set +e +o pipefail
  local i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    [[ ${COMPONENTS[i]} == containerd ]] && kill_pods
    stop_component "${COMPONENTS[i]}"
  done
  kill_pods
  unmount_under "$STATE" "$RUN"
  clean_netns
  # The pods' host-side veths (a peer namespace some process still holds would keep them alive).
  ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
    | xargs -r -n1 ip link del 2>/dev/null
  ip link del "$BRIDGE" 2>/dev/null || true
  ip link del "$NODE_IF" 2>/dev/null || true
  clean_iptables
  rm -rf "$STATE" "$RUN" "$REPO/.sandbox"
  skaffold_config unset
  log "sandbox down"
}

# leftovers: print whatever `down` should have removed; exit 1 if anything is left.
leftovers() {
  set +e +o pipefail
  local found=0 line
  # Writes to a file, not a variable: each `... | report` runs in a subshell.
  local flag; flag=$(mktemp)
  report() { while read -r line; do [[ -n $line ]] && { echo "left behind: $1: $line"; echo 1 >"$flag"; }; done; }
  pgrep -a -f "$STATE|$RUN|jobs-sandbox/kubernetes-|containerd-shim-runc-v2 .*$CONTAINERD_SOCK" | grep -v -e pgrep -e 'build.sh' -e 'go build' | report process
  grep -E " ($STATE|$RUN)" /proc/mounts | report mount
  ls -d /var/run/netns/cni-* 2>/dev/null | report netns
  ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | grep -E "^($BRIDGE|$NODE_IF)(@|$)" | report interface
  ip -o link show type veth 2>/dev/null | grep -v 'master docker' | awk -F': ' '{print $2}' | report veth
  for ipt in iptables ip6tables; do
    $ipt-save 2>/dev/null | grep -E '^:(KUBE-|CNI-)' | sed "s/^/$ipt /" | report rule
  done
  nft list tables 2>/dev/null | grep -E 'kube-proxy|kube-network-policies' | report nftables
  ipset list -n 2>/dev/null | grep -E '^(inet6:)?KUBE-' | report ipset
  [[ -e $STATE || -e $RUN ]] && echo "$STATE $RUN" | report state
  [[ -s $flag ]] && found=1
  rm -f "$flag"
  return $found
}

status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    if running "$c"; then echo "$c: running (pid $(cat "$(pidfile "$c")"))"; else echo "$c: stopped"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  leftovers) leftovers ;;
  *) echo "usage: $0 up|down|status|leftovers" >&2; exit 2 ;;
esac
