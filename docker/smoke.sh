#!/usr/bin/env bash
# Build both Atoll images and run a real one-round consortium in containers, end to end.
#
#   sudo docker/smoke.sh            # base image (if missing) + build + run; exits non-zero on any failure
#   sudo docker/smoke.sh build      # only the images        sudo docker/smoke.sh run   # only the consortium
#
# What it does, with podman (preferred) or docker, whichever is installed:
#  1. base:  a local Debian base image where no registry is reachable (docker/make-base.sh: debootstrap ->
#            import), unless BASE_IMAGE names one that exists. This is the CPU *test* base; hospitals build
#            Dockerfile.client on its CUDA default.
#  2. build: Dockerfile.server and Dockerfile.client on that base. The builder's own pip configuration (index,
#            local wheel folders, CA bundle; `pip config list`, which includes PIP_* variables) is mounted into
#            the build only (`podman build -v`), never baked into an image. Prints build time and image size.
#  3. run:   on a private container network (--internal: nothing outside it is reachable): the consortium CA
#            and SuperLink certificate (`atoll consortium init`), two hospitals (`atoll site init`, `site
#            enroll`) with the demo's DICOM exports, a SuperLink with TLS and node authentication, and per
#            hospital a SuperNode in process isolation plus `atoll-superexec` (the site's launcher that checks
#            the run's bundle against the site's approvals before any of its code runs) sharing its network
#            namespace. Every container: read-only root, all capabilities dropped, no-new-privileges. The
#            lead registers the node keys, writes the run manifest, the sites approve it, and `atoll run
#            start` runs one short round. Checks: the run finished, both sites contributed, the weights and
#            the consortium's ledger copy are there, each site's ledger has its record, and `podman diff` of
#            every site container is empty (nothing written outside /state and the tmpfs mounts).
#
# Environment (all optional):
#   ATOLL_CONTAINER_ENGINE  podman or docker (default: podman if installed, else docker)
#   ATOLL_CONTAINER_WORK    work folder outside the repository (default /var/tmp/atoll-containers)
#   BASE_IMAGE              base of both images (default localhost/atoll-base:<host's Debian release>)
#   TORCH_INDEX_URL         torch wheel index for both builds (default empty: what the builder's pip finds,
#                           e.g. a local CPU wheel; https://download.pytorch.org/whl/cpu where reachable)
#   SITE_IMAGE, SUPERLINK_IMAGE   tags (default localhost/atoll-site:cpu, localhost/atoll-superlink:cpu)
#   ATOLL_SMOKE_SUBNET      the private network's /24 prefix (default 10.89.77)
#   ATOLL_SMOKE_KEEP=1      leave the containers and network up after the run (for a look around)
#   ATOLL_SMOKE_TIMEOUT     seconds the run may take (default 1500)
# With podman, CONTAINERS_CONF defaults to docker/containers.conf (runc; lower nofile/nproc limits).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PHASE=${1:-all}
WORK=${ATOLL_CONTAINER_WORK:-/var/tmp/atoll-containers}
SUITE=$( . /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-bookworm}") || SUITE=bookworm
BASE_IMAGE=${BASE_IMAGE:-localhost/atoll-base:${SUITE:-bookworm}}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
SITE_IMAGE=${SITE_IMAGE:-localhost/atoll-site:cpu}
SUPERLINK_IMAGE=${SUPERLINK_IMAGE:-localhost/atoll-superlink:cpu}
SUBNET=${ATOLL_SMOKE_SUBNET:-10.89.77}
TIMEOUT=${ATOLL_SMOKE_TIMEOUT:-1500}
NET=atoll-smoke
P=atoll-smoke          # container name prefix
SITES=(hospital-a hospital-b)
APP_UID=49999          # the images' `app` user

say() { printf '\n== smoke.sh: %s\n' "$*"; }
die() { printf 'smoke.sh: FAILED: %s\n' "$*" >&2; exit 1; }

case "$PHASE" in all|base|build|run) ;; *) die "unknown phase '$PHASE' (all, base, build, run)";; esac

ENGINE=${ATOLL_CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if command -v podman >/dev/null; then ENGINE=podman
    elif command -v docker >/dev/null; then ENGINE=docker
    else die "no container engine: install podman (apt-get install podman runc) or docker"; fi
fi
command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed"
if [ "$ENGINE" = podman ]; then
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
fi
mkdir -p "$WORK"

image_exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }
image_size_mb() { "$ENGINE" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1e6}'; }

# -- 1. base image ----------------------------------------------------------------------------------------
phase_base() {
    if image_exists "$BASE_IMAGE"; then
        say "base image $BASE_IMAGE exists"
        return
    fi
    case "$BASE_IMAGE" in
        localhost/*) say "making base image $BASE_IMAGE (debootstrap $SUITE)"
                     BASE_IMAGE=$BASE_IMAGE ATOLL_CONTAINER_ENGINE=$ENGINE ATOLL_CONTAINER_WORK=$WORK \
                         SUITE=$SUITE "$HERE/make-base.sh" ;;
        *) say "pulling base image $BASE_IMAGE"; "$ENGINE" pull "$BASE_IMAGE" ;;
    esac
}

# -- 2. build ---------------------------------------------------------------------------------------------
BUILD_ARGS=()
build_pip_config() {
    # The builder's pip settings as one pip.conf for the build, plus the local paths it names (mounted
    # read-only at the same place). The CA bundle is copied next to it (not mounted over the image's own).
    local conf="$WORK/build-conf"
    rm -rf "$conf" && mkdir -p "$conf"
    local pip_cmd=${PIP:-}
    if [ -z "$pip_cmd" ]; then
        if command -v pip >/dev/null; then pip_cmd=pip; else pip_cmd="python3 -m pip"; fi
    fi
    local listing
    listing=$($pip_cmd config list 2>/dev/null || true)
    local mounts
    mounts=$(LISTING="$listing" CONF="$conf" python3 - <<'PY'
import os, re, shutil
conf = os.environ["CONF"]
settings = {}
for line in os.environ["LISTING"].splitlines():
    m = re.match(r"^[^.]*\.([\w-]+)='(.*)'$", line.strip())
    if m:
        settings[m.group(1)] = m.group(2)
mounts = []
for key in ("cert", "constraint", "requirement"):
    if key in settings and os.path.isfile(settings[key]):
        name = {"cert": "ca.crt"}.get(key, key + ".txt")
        shutil.copy(settings[key], os.path.join(conf, name))
        settings[key] = "/run/atoll-build/" + name
for key in ("find-links", "extra-index-url", "index-url"):
    for item in settings.get(key, "").split():
        path = item[len("file://"):] if item.startswith("file://") else item
        if path.startswith("/") and os.path.isdir(path):
            # a file:// "simple" index links its wheels relative to itself (../files/...): mount its parent
            mounts.append(os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == "simple"
                          else path)
with open(os.path.join(conf, "pip.conf"), "w") as f:
    f.write("[global]\n")
    for key, value in settings.items():
        f.write(f"{key} = {value}\n")
print("\n".join(sorted(set(mounts))))
PY
)
    BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    if [ "$ENGINE" = podman ]; then
        BUILD_ARGS+=(--network host -v "$conf:/run/atoll-build:ro" --build-arg PIP_CONFIG_FILE=/run/atoll-build/pip.conf)
        local m
        while IFS= read -r m; do
            [ -n "$m" ] && BUILD_ARGS+=(-v "$m:$m:ro")
        done <<< "$mounts"
    else
        # docker build has no -v: the build uses the image's own pip defaults (PyPI) on the host network.
        BUILD_ARGS+=(--network host)
    fi
    echo "pip configuration for the builds ($conf/pip.conf, mounted read-only):"
    sed 's/^/    /' "$conf/pip.conf"
}

build_one() {
    local dockerfile=$1 tag=$2 start end
    say "building $tag from docker/$dockerfile on $BASE_IMAGE"
    local log="$WORK/build-${dockerfile#Dockerfile.}.log"
    start=$(date +%s)
    if ! "$ENGINE" build "${BUILD_ARGS[@]}" -f "$HERE/$dockerfile" -t "$tag" "$REPO" > "$log" 2>&1; then
        tail -n 25 "$log" >&2
        die "building $tag (whole log: $log)"
    fi
    end=$(date +%s)
    grep -E 'STEP [0-9]+/[0-9]+: (FROM|RUN pip)' "$log" | cut -c1-110 | sed 's/^/    /' || true
    echo "BUILD $tag: $(( end - start )) s, $(image_size_mb "$tag") MB"
    echo "$tag $(( end - start )) $(image_size_mb "$tag")" >> "$WORK/build-times.txt"
}

phase_build() {
    image_exists "$BASE_IMAGE" || die "base image $BASE_IMAGE is missing (run: $0 base)"
    build_pip_config
    : > "$WORK/build-times.txt"
    build_one Dockerfile.server "$SUPERLINK_IMAGE"
    build_one Dockerfile.client "$SITE_IMAGE"
    say "images start"
    "$ENGINE" run --rm --entrypoint atoll "$SITE_IMAGE" --help >/dev/null || die "atoll --help in $SITE_IMAGE"
    "$ENGINE" run --rm "$SITE_IMAGE" --help >/dev/null || die "flower-supernode --help in $SITE_IMAGE"
    "$ENGINE" run --rm "$SUPERLINK_IMAGE" --help >/dev/null || die "flower-superlink --help in $SUPERLINK_IMAGE"
    "$ENGINE" run --rm --entrypoint python3 "$SITE_IMAGE" -c \
        'import torch, flwr, os; print("site image: torch", torch.__version__, "flwr", flwr.__version__);
assert not os.path.exists("/etc/pip.conf") and not os.path.exists("/run/atoll-build/pip.conf")'
}

# -- 3. run -----------------------------------------------------------------------------------------------
CONTAINERS=()
# /home/app (FLWR_HOME: Flower unpacks each run's FAB there) is a tmpfs the app user must own: podman mounts
# tmpfs as root 0755 (its `U` option chowns it to the container's user); docker's tmpfs is 1777 already.
if [ "$ENGINE" = podman ]; then HOME_TMPFS=/home/app:rw,U; else HOME_TMPFS=/home/app:rw,mode=1777; fi
HARDEN=(--read-only --cap-drop ALL --security-opt no-new-privileges --label atoll-smoke=1
        --tmpfs /tmp:rw,mode=1777 --tmpfs "$HOME_TMPFS")
FLWR_ENV=(-e FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 -e FLWR_TELEMETRY_ENABLED=0 -e FLWR_DISABLE_UPDATE_CHECK=1)

cleanup() {
    local rc=$?
    if [ "${ATOLL_SMOKE_KEEP:-0}" = 1 ]; then
        echo "smoke.sh: containers left running (ATOLL_SMOKE_KEEP=1): ${CONTAINERS[*]:-none}"
        exit "$rc"
    fi
    if [ "$rc" != 0 ] && [ "${#CONTAINERS[@]}" -gt 0 ]; then
        for c in "${CONTAINERS[@]}"; do
            echo "--- last log lines of $c"
            "$ENGINE" logs --tail 25 "$c" 2>&1 | sed 's/^/    /' || true
        done
    fi
    remove_leftovers
    exit "$rc"
}

# Every container this script starts carries the label atoll-smoke=1 (one-offs included); the network is ours.
remove_leftovers() {
    local left
    left=$("$ENGINE" ps -aq --filter label=atoll-smoke=1 2>/dev/null || true)
    # one by one, newest first (`ps` order): a launcher goes before the SuperNode whose namespace it shares
    local c
    for c in $left; do "$ENGINE" kill "$c" >/dev/null 2>&1 || true; done
    for c in $left; do "$ENGINE" rm -f "$c" >/dev/null 2>&1 || true; done
    if "$ENGINE" network inspect "$NET" >/dev/null 2>&1; then
        "$ENGINE" network rm "$NET" >/dev/null 2>&1 || sleep 3
        "$ENGINE" network rm "$NET" >/dev/null 2>&1 || true
    fi
}

# A one-off command in an image: the lead's or a site's CLI, as the same hardened, unprivileged container.
oneoff() { "$ENGINE" run --rm "${HARDEN[@]}" "${FLWR_ENV[@]}" --network "$NET" "$@"; }

phase_run() {
    image_exists "$SITE_IMAGE" || die "$SITE_IMAGE is missing (run: $0 build)"
    image_exists "$SUPERLINK_IMAGE" || die "$SUPERLINK_IMAGE is missing (run: $0 build)"
    trap cleanup EXIT
    trap 'exit 143' TERM INT
    local run="$WORK/run" start
    start=$(date +%s)
    remove_leftovers
    rm -rf "$run"
    mkdir -p "$run/pki" "$run/lead/flwr" "$run/site-keys" "$run/superlink-state" "$WORK/pacs"
    for s in "${SITES[@]}"; do mkdir -p "$run/$s/site" "$run/$s/keys" "$run/$s/state"; done
    chown -R "$APP_UID:$APP_UID" "$run" "$WORK/pacs"   # the images run as uid 49999; files stay 0600 for it
    "$ENGINE" network inspect "$NET" >/dev/null 2>&1 && die "network $NET exists and cannot be removed: $ENGINE network rm $NET"
    "$ENGINE" network create --internal --subnet "$SUBNET.0/24" "$NET" >/dev/null
    local link_ip="$SUBNET.10"
    local hosts=(--add-host "superlink:$link_ip")

    say "lead: consortium CA and SuperLink certificate (atoll consortium init, in $SUPERLINK_IMAGE)"
    oneoff --entrypoint atoll -v "$run/pki:/out" "$SUPERLINK_IMAGE" \
        consortium init --out /out/pki --host superlink >/dev/null
    cat > "$run/lead/flwr/config.toml" <<EOF
[superlink.consortium]
address = "superlink:8000"
root-certificates = "/pki/ca.crt"
EOF
    chown -R "$APP_UID:$APP_UID" "$run/lead"

    say "sites: the demo's DICOM exports, site identity, node key (atoll site init / enroll, in $SITE_IMAGE)"
    # the demo's exports are kept between runs ($WORK/pacs): writing 5,000 DICOM files takes minutes
    [ -f "$WORK/pacs/pacs/consortium.json" ] \
        || oneoff --entrypoint atoll -v "$WORK/pacs:/out" "$SITE_IMAGE" demo --data-only --out /out/pacs >/dev/null
    for s in "${SITES[@]}"; do
        oneoff --entrypoint sh -v "$run/$s/site:/site" -v "$WORK/pacs/pacs/$s:/data:ro" -v "$run/$s/keys:/keys" \
            -v "$run/pki/pki/ca.crt:/ca.crt:ro" "$SITE_IMAGE" -c "
            set -e
            atoll site init --out /site/new --name $s --dicom /data/dicom --labels /data/labels.csv \
                --label-column pneumonia >/dev/null
            # container paths: the site's state is the /state volume, its files live in /site
            sed -e 's|^state_dir *=.*|state_dir = \"/state\"|' /site/new/site.toml > /site/site.toml
            mv /site/new/site_ed25519.pem /site/new/site_ed25519.pub /site/new/pseudonym.secret /site/
            rm -rf /site/new
            atoll site enroll --out /keys --name $s --ca /ca.crt >/dev/null"
        grep -q '^state_dir = "/state"' "$run/$s/site/site.toml" || die "$s: site.toml has no state_dir to point at /state"
        cp "$run/$s/site/site_ed25519.pub" "$run/site-keys/$s.pub"
    done
    chown -R "$APP_UID:$APP_UID" "$run/site-keys"

    say "lead: SuperLink (TLS, --enable-supernode-auth) at superlink:8000 on the private network $NET"
    "$ENGINE" run -d --name "$P-superlink" "${HARDEN[@]}" "${FLWR_ENV[@]}" --network "$NET" --ip "$link_ip" \
        -v "$run/pki/pki/ca.crt:/pki/ca.crt:ro" -v "$run/pki/pki/server.pem:/pki/server.pem:ro" \
        -v "$run/pki/pki/server.key:/pki/server.key:ro" -v "$run/site-keys:/site-keys:ro" \
        -v "$run/superlink-state:/state" "$SUPERLINK_IMAGE" >/dev/null
    CONTAINERS+=("$P-superlink")
    [ -e "$run/pki/pki/ca.key" ] || die "atoll consortium init wrote no ca.key"   # stays on the host, unmounted

    # The lead's CLI: the SuperLink image on the private network, its Flower connection in /lead/flwr.
    lead() {
        oneoff "${hosts[@]}" -e FLWR_HOME=/lead/flwr -v "$run/lead:/lead" -v "$run/pki/pki/ca.crt:/pki/ca.crt:ro" \
            -v "$run/site-keys:/site-keys" -v "$run/superlink-state:/state" \
            -v "$run/hospital-a/keys/node_auth_key.pub:/nodes/hospital-a.pub:ro" \
            -v "$run/hospital-b/keys/node_auth_key.pub:/nodes/hospital-b.pub:ro" \
            --entrypoint "${lead_entry:-atoll}" "$SUPERLINK_IMAGE" "$@"
    }
    # The consortium's digest-signing key lives in the keys folder, which the SuperLink mounts read-only.
    say "lead: the consortium's digest key in the keys folder, then register the sites' node keys"
    lead_entry=python3 lead -c 'from privacy.anchor import load_or_create_consortium_key as k; k("/site-keys")'
    [ -s "$run/site-keys/consortium_ed25519.pub" ] || die "no consortium digest key"
    local tries=0
    until lead consortium register /nodes/hospital-a.pub --name hospital-a --superlink consortium --yes; do
        tries=$((tries + 1)); [ "$tries" -lt 20 ] || die "the SuperLink does not answer"; sleep 5
    done
    lead consortium register /nodes/hospital-b.pub --name hospital-b --superlink consortium --yes
    say "lead: run manifest (1 round, 2 local steps)"
    lead run manifest --out /lead/run-manifest.json --rounds 1 --local-steps 2

    local s
    for s in "${SITES[@]}"; do
        local site_mounts=(-v "$run/$s/site:/site:ro" -v "$WORK/pacs/pacs/$s:/data:ro" -v "$run/$s/state:/state")
        say "$s: check the data and approve the run (atoll site check / approve)"
        oneoff --entrypoint atoll "${site_mounts[@]}" "$SITE_IMAGE" site check --config /site/site.toml | tail -3
        oneoff --entrypoint atoll "${site_mounts[@]}" -v "$run/lead/run-manifest.json:/manifest.json:ro" \
            "$SITE_IMAGE" site approve --config /site/site.toml --manifest /manifest.json --yes | tail -2
        say "$s: SuperNode (--isolation process, TLS, node key) + atoll-superexec in its network namespace"
        "$ENGINE" run -d --name "$P-$s" "${HARDEN[@]}" "${FLWR_ENV[@]}" --network "$NET" "${hosts[@]}" \
            -v "$run/$s/keys:/keys:ro" "$SITE_IMAGE" \
            --isolation process --superlink superlink:8000 --root-certificates /keys/ca.crt \
            --auth-supernode-private-key /keys/node_auth_key --host 127.0.0.1 --port 9094 \
            --node-config 'site-config="/site/site.toml"' >/dev/null
        CONTAINERS+=("$P-$s")
        "$ENGINE" run -d --name "$P-$s-exec" "${HARDEN[@]}" "${FLWR_ENV[@]}" --network "container:$P-$s" \
            "${site_mounts[@]}" --entrypoint atoll-superexec "$SITE_IMAGE" \
            --runtime-api-address 127.0.0.1:9094 --insecure >/dev/null
        CONTAINERS+=("$P-$s-exec")
    done

    say "lead: atoll run start (1 round, 2 local steps, both sites)"
    lead run start --superlink consortium --run-dir /state/runs --run-name smoke --keys-dir /site-keys \
        --rounds 1 --local-steps 2 --num-sites 2
    local waited=$(( TIMEOUT - ( $(date +%s) - start ) ))
    [ "$waited" -gt 60 ] || waited=60
    lead run status /state/runs/smoke --wait "$waited" || die "the run did not finish well (atoll run status)"

    say "checks"
    python3 - "$run/superlink-state/runs/smoke" "${SITES[@]}" <<'PY' || die "the run's outputs"
import json, sys
from pathlib import Path
folder, sites = Path(sys.argv[1]), sys.argv[2:]
status = json.loads((folder / "status.json").read_text())
print("status.json:", status)
assert status["status"] == "completed" and status["rounds"] == 1, status
history = json.loads((folder / "history.json").read_text())
assert len(history) == 1, history
for site in sites:
    entry = history[0]["sites"].get(site)
    assert entry and entry["status"] == "contributed", f"{site}: {entry}"
    print(f"round 1, {site}: {entry['status']}, epsilon {entry.get('epsilon')}")
print("round 1 aggregated:", history[0].get("aggregated"))
weights = sorted(p.name for p in (folder / "weights").iterdir())
assert "round-001.pt" in weights, weights
records = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines() if line.strip()]
assert len(records) >= len(sites), f"{len(records)} ledger records in the consortium's copy"
assert (folder / "digests.jsonl").read_text().strip(), "no signed round digest"
print("run folder:", sorted(p.name for p in folder.iterdir()), "weights:", weights)
PY
    for s in "${SITES[@]}"; do
        [ -s "$run/$s/state/ledger.jsonl" ] || die "$s wrote no ledger record"
        echo "$s: ledger $(wc -l < "$run/$s/state/ledger.jsonl") record(s), approvals $(wc -l < "$run/$s/state/approvals.jsonl")"
    done
    local c changes dirty=0
    for c in "${CONTAINERS[@]}"; do
        [ "$c" = "$P-superlink" ] && continue
        changes=$("$ENGINE" diff "$c" 2>&1 || true)
        if [ -n "$changes" ]; then
            echo "DIFF $c: wrote outside /state:"; echo "$changes" | sed 's/^/    /'; dirty=1
        else
            echo "DIFF $c: empty (nothing written outside /state and the tmpfs mounts)"
        fi
    done
    [ "$dirty" = 0 ] || die "a site container wrote outside /state"
    # the site's processes run under TCMalloc (client/allocator.py): a process started in each site container,
    # with the image's environment as its PID 1 has (whose maps a capability-less container may not read), has
    # the library mapped
    for c in "${CONTAINERS[@]}"; do
        [ "$c" = "$P-superlink" ] && continue
        "$ENGINE" exec "$c" python3 -c 'import sys; sys.exit("libtcmalloc" not in open("/proc/self/maps").read())' \
            || die "$c: its process does not run under TCMalloc (LD_PRELOAD)"
        echo "ALLOCATOR $c: tcmalloc"
    done
    echo "RUN: one round, ${#SITES[@]} sites, $(( $(date +%s) - start )) s (new PKI, sites, SuperLink; demo exports reused)"
}

case "$PHASE" in
    base) phase_base ;;
    build) phase_build ;;
    run) phase_run ;;
    all) phase_base; phase_build; phase_run ;;
esac
say "OK ($PHASE)"
