#!/usr/bin/env bash
# Build the Kubernetes control plane that the cluster tests run against, from Go modules.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  <- k8s.io/kubernetes
#   etcd                                                              <- go.etcd.io/etcd/server/v3
#   kwok                                                              <- sigs.k8s.io/kwok
#   helm                                                              <- helm.sh/helm/v3
#
# Every binary is pinned and cached under $KUBEFORGE_CACHE/bin/<name>-<version>; a binary
# that is already there is not rebuilt. Prints the directory holding them on the last line.
#
# Why wrapper modules: `go install k8s.io/kubernetes/cmd/...@vX` fails because that module
# requires its staging modules (k8s.io/api, ...) at v0.0.0 and replaces them with local
# paths, and a dependency's replace lines are ignored. A throw-away module that requires
# k8s.io/kubernetes and repeats each staging replace with the published v0.<minor>.<patch>
# builds the real release. The list of staging modules is read from the go.mod the module
# proxy serves for that release, so a version bump needs no hand-edited list.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"

CACHE="${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}"
BIN="$CACHE/bin"
WORK="$CACHE/gobuild"
mkdir -p "$BIN" "$WORK"
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -trimpath"

log() { printf '[build-control-plane] %s\n' "$*" >&2; }
# Time and peak memory of each build step, where GNU time is installed.
timed() {  # label command...
  local label=$1; shift
  if [ -x /usr/bin/time ]; then /usr/bin/time -f "[build-control-plane] $label: %e s, peak RSS %M KiB" "$@"; else "$@"; fi
}
have() { [ -x "$BIN/$1-$2" ]; }

build_kubernetes() {
  local targets=() t
  for t in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    have "$t" "$K8S_VERSION" || targets+=("$t")
  done
  [ ${#targets[@]} -eq 0 ] && return 0
  local dir="$WORK/kubernetes-$K8S_VERSION" minor patch gomod
  minor=$(echo "$K8S_VERSION" | cut -d. -f2); patch=$(echo "$K8S_VERSION" | cut -d. -f3)
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  go mod init kubeforge.local/k8s-build >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || { log "could not fetch go.mod of k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
  # Staging modules: "k8s.io/foo => ./staging/src/k8s.io/foo" inside the replace block.
  local mods
  mods=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod")
  [ -n "$mods" ] || { log "no staging replace lines found in $gomod"; exit 1; }
  log "kubernetes $K8S_VERSION: $(echo "$mods" | wc -l) staging modules"
  local m
  for m in $mods; do go mod edit -replace "$m=$m@v0.$minor.$patch"; done
  go mod edit -go="$(sed -n 's/^go \(.*\)/\1/p' "$gomod")"
  go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
  local pkgs=()
  for t in "${targets[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$t"); done
  go get "${pkgs[@]/%/@$K8S_VERSION}" >&2
  local ld="" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  for t in "${targets[@]}"; do
    log "building $t $K8S_VERSION"
    timed "$t" go build -tags selinux,notest -ldflags "-s -w $ld" -o "$BIN/$t-$K8S_VERSION.tmp" "k8s.io/kubernetes/cmd/$t"
    mv "$BIN/$t-$K8S_VERSION.tmp" "$BIN/$t-$K8S_VERSION"
  done
}

build_etcd() {
  have etcd "$ETCD_VERSION" && return 0
  local dir="$WORK/etcd-$ETCD_VERSION"
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  go mod init kubeforge.local/etcd-build >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  log "building etcd $ETCD_VERSION"
  timed "etcd" go build -ldflags "-s -w" -o "$BIN/etcd-$ETCD_VERSION.tmp" go.etcd.io/etcd/server/v3
  mv "$BIN/etcd-$ETCD_VERSION.tmp" "$BIN/etcd-$ETCD_VERSION"
}

go_install() {  # name version package
  have "$1" "$2" && return 0
  local dir="$WORK/$1-$2"
  rm -rf "$dir"; mkdir -p "$dir"
  log "building $1 $2"
  timed "$1" env GOBIN="$dir" go install -ldflags "-s -w" "$3@$2"
  mv "$dir/$1" "$BIN/$1-$2"
}

start=$(date +%s)
build_etcd
go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
build_kubernetes
# Stable names for the test fixture and for people: bin/<name> -> <name>-<version>.
for n in kube-apiserver kube-controller-manager kube-scheduler kubectl; do ln -sf "$n-$K8S_VERSION" "$BIN/$n"; done
ln -sf "etcd-$ETCD_VERSION" "$BIN/etcd"; ln -sf "kwok-$KWOK_VERSION" "$BIN/kwok"; ln -sf "helm-$HELM_VERSION" "$BIN/helm"
log "all binaries ready in $(( $(date +%s) - start )) s"
echo "$BIN"
