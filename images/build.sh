#!/usr/bin/env bash
# Build the trainer and serving images with buildah (no Docker engine, no container registry needed) and
# run them:
#   base   a local base image: Debian bookworm + python3 made with debootstrap (skipped with a BASE_IMAGE
#          that can be pulled, e.g. BASE_IMAGE=python:3.11.14-slim-bookworm, the Dockerfiles' default)
#   build  images/trainer/Dockerfile and images/serving/Dockerfile, BASE_IMAGE passed as a build arg
#   check  in the trainer image: the compiled pipeline's prepare-data command line (python3 -m
#          kfp.dsl.executor_main ...) with a KFP ExecutorInput, on digits; a 1-epoch smoke training and the
#          export of S4. In the serving image: the entrypoint with the ClusterServingRuntime's args on that
#          student, one V1 and one V2 request on 127.0.0.1. Both run offline, in a network namespace of
#          their own that has only loopback.
# Sizes and times are printed and written to $WORK/report.txt.
#
# Usage: images/build.sh [all|base|build|check|check-trainer|check-serving]   (default all = make images)
# Needs: root, buildah, debootstrap (Debian: apt-get install buildah debootstrap), unshare and ip.
# Environment (defaults in brackets):
#   REGISTRY [ghcr.io/bockd]  VERSION [pyproject's]     the tags: $REGISTRY/bockd-{trainer,serving}:$VERSION
#   BASE_IMAGE [local]        `local`: the debootstrapped $LOCAL_BASE; anything else is pulled
#   LOCAL_BASE [localhost/bockd-base:bookworm]  REBUILD_BASE [0]  DEBIAN_MIRROR [http://deb.debian.org/debian]
#   STORAGE_DRIVER [vfs]  ISOLATION [chroot]    what works without a container runtime or overlay mounts
#   BUILD_CA_BUNDLE [$PIP_CERT, else /etc/ssl/certs/ca-certificates.crt]  CA bundle pip trusts while
#       building (a TLS-intercepting proxy's CA, say); mounted for the RUN steps only, never in the image.
#       Empty: pip's own.
#   IMAGES ["serving trainer"]  which images `build` (and `all`) builds
#   PULL_SIZE [0]             1: measure the trainer's compressed size too (gzip of 7 GB: minutes)
#   WORK [.build/images]      scratch: check outputs, report
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

REGISTRY=${REGISTRY:-ghcr.io/bockd}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)}
TRAINER=$REGISTRY/bockd-trainer:$VERSION
SERVING=$REGISTRY/bockd-serving:$VERSION
BASE_IMAGE=${BASE_IMAGE:-local}
LOCAL_BASE=${LOCAL_BASE:-localhost/bockd-base:bookworm}
REBUILD_BASE=${REBUILD_BASE:-0}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
ISOLATION=${ISOLATION:-chroot}
BUILD_CA_BUNDLE=${BUILD_CA_BUNDLE-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
WORK=${WORK:-$REPO/.build/images}
IMAGES=${IMAGES:-serving trainer}
PULL_SIZE=${PULL_SIZE:-0}
MODEL_NAME=bockd-digits-resnet20-s4 # what KServe's {{.Name}} would be for this student's InferenceService

CONTAINERS=()
REPORT=$WORK/report.txt

log() { printf '\n== %s\n' "$*" >&2; }
die() {
    printf 'images/build.sh: error: %s\n' "$*" >&2
    exit 1
}
bh() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
record() { printf '%s\n' "$*" | tee -a "$REPORT" >&2; }

cleanup() {
    local ctr
    for ctr in "${CONTAINERS[@]}"; do
        bh rm "$ctr" > /dev/null 2>&1 || true
    done
}
trap cleanup EXIT

preflight() {
    [[ $(id -u) == 0 ]] || die "run as root (buildah with --isolation chroot and debootstrap need it)"
    local tool
    for tool in buildah unshare ip; do
        command -v "$tool" > /dev/null || die "$tool not found (Debian: apt-get install buildah iproute2)"
    done
    [[ -n $VERSION ]] || die "no version found in pyproject.toml; set VERSION"
    mkdir -p "$WORK"
}

base_ref() { [[ $BASE_IMAGE == local ]] && echo "$LOCAL_BASE" || echo "$BASE_IMAGE"; }

# What Debian's own slim images leave out (debuerreotype's --slimify): documentation (copyright files
# kept), manuals, translations. Written into the base for later apt installs too.
DPKG_SLIM='path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*'

slim_rootfs() {
    local root=$1
    printf '%s\n' "$DPKG_SLIM" > "$root/etc/dpkg/dpkg.cfg.d/bockd-slim"
    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/*
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
}

# Debian bookworm (minbase) + python3 and its venv module, as a base image: what the public
# python:3.11-slim-bookworm offers the Dockerfiles, made from the Debian archive alone.
make_base() {
    if [[ $BASE_IMAGE != local ]]; then
        log "base: $BASE_IMAGE (pulled by the build)"
        return
    fi
    if [[ $REBUILD_BASE != 1 ]] && bh inspect --type image "$LOCAL_BASE" > /dev/null 2>&1; then
        log "base: $LOCAL_BASE exists (REBUILD_BASE=1 makes it again)"
        return
    fi
    command -v debootstrap > /dev/null || die "debootstrap not found (Debian: apt-get install debootstrap)"
    log "base: debootstrap bookworm from $DEBIAN_MIRROR into $LOCAL_BASE"
    local start=$SECONDS ctr mnt previous
    previous=$(bh images --quiet "$LOCAL_BASE" 2> /dev/null || true)
    ctr=$(bh from scratch)
    CONTAINERS+=("$ctr")
    mnt=$(bh mount "$ctr")
    nice -n 10 debootstrap --variant=minbase --include=ca-certificates,netbase,python3,python3-venv \
        bookworm "$mnt" "$DEBIAN_MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $WORK/debootstrap.log"
    slim_rootfs "$mnt"
    bh umount "$ctr" > /dev/null
    bh config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd python3 --label org.opencontainers.image.base.name="debian:bookworm (debootstrap)" "$ctr"
    bh commit --quiet --rm "$ctr" "$LOCAL_BASE" > /dev/null
    CONTAINERS=()
    remove_replaced "$previous" "$LOCAL_BASE"
    record "base $LOCAL_BASE: $(image_size "$LOCAL_BASE"), made in $((SECONDS - start)) s"
}

image_size() { bh images --format '{{.Size}}' "$1" | head -n 1; }

# The image a new build of the same tag replaced (with vfs, a full copy on disk); kept while still in use.
remove_replaced() {
    local previous=$1 tag=$2
    if [[ -n $previous && $previous != "$(bh images --quiet "$tag")" ]]; then
        bh rmi "$previous" > /dev/null 2>&1 || true
    fi
}

# What a node downloads (gzip-compressed layers, as a registry would store them): written to an OCI layout.
pull_size() {
    local dir=$WORK/oci-$2 mb
    rm -rf "$dir"
    nice -n 10 buildah --storage-driver "$STORAGE_DRIVER" push --quiet "$1" "oci:$dir" > /dev/null
    # In MB with floats: mawk's integers are 32-bit, a 7 GB image overflows them.
    mb=$(find "$dir/blobs" -type f -printf '%s\n' | awk '{s += $1} END {printf "%.0f", s / 1e6}')
    rm -rf "$dir"
    echo "$mb MB"
}

# The CA bundle and a pip.conf naming it, bind-mounted into every RUN step (not committed).
ca_mounts() {
    [[ -n $BUILD_CA_BUNDLE ]] || return 0
    [[ -r $BUILD_CA_BUNDLE ]] || die "BUILD_CA_BUNDLE=$BUILD_CA_BUNDLE cannot be read"
    local conf=$WORK/pip-build.conf
    printf '[global]\ncert = /run/bockd-build/ca.crt\n' > "$conf"
    printf -- '--volume=%s:/run/bockd-build/ca.crt:ro\n--volume=%s:/etc/pip.conf:ro\n' \
        "$(realpath "$BUILD_CA_BUNDLE")" "$conf"
}

# The whole log goes to $WORK/build-NAME.log; the steps are shown as they start.
build_one() {
    local name=$1 tag=$2 start=$SECONDS log mounts rc previous
    log=$WORK/build-$name.log
    previous=$(bh images --quiet "$tag" 2> /dev/null || true)
    mapfile -t mounts < <(ca_mounts)
    log "build: $tag (images/$name/Dockerfile, BASE_IMAGE=$(base_ref)), log: $log"
    { # set -e would end this group at a failing build before its status is kept: hence && ||
        nice -n 10 buildah --storage-driver "$STORAGE_DRIVER" bud --isolation "$ISOLATION" --layers=false \
            --pull=false "${mounts[@]}" --build-arg "BASE_IMAGE=$(base_ref)" -f "images/$name/Dockerfile" \
            -t "$tag" . 2>&1 && echo 0 > "$log.rc" || echo "$?" > "$log.rc"
    } | tee "$log" | { grep --line-buffered -E '^(STEP|COMMIT)' >&2 || true; }
    rc=$(cat "$log.rc")
    rm -f "$log.rc"
    if [[ $rc != 0 ]]; then
        tail -n 25 "$log" >&2
        die "building $tag failed (exit $rc); the whole log: $log"
    fi
    remove_replaced "$previous" "$tag"
    local built=$((SECONDS - start)) pull="not measured (PULL_SIZE=1)"
    [[ $name == serving || $PULL_SIZE == 1 ]] && pull=$(pull_size "$tag" "$name")
    record "$name $tag: $(image_size "$tag") ($pull compressed), built in $built s (BASE_IMAGE=$(base_ref))"
}

# A shell script inside a working container of an image, offline: in a network namespace of its own with
# only loopback (the server's 0.0.0.0 is reachable from nowhere else). The rest of the args: run options.
in_image() {
    local ctr=$1 script=$2
    shift 2
    unshare --net sh -ec 'ip link set lo up; exec "$@"' sh \
        buildah --storage-driver "$STORAGE_DRIVER" run --isolation "$ISOLATION" "$@" "$ctr" -- \
        sh -ec "$script"
}

check_trainer() {
    local check=$1 ctr start=$SECONDS
    log "check: $TRAINER (prepare-data through the KFP executor, 1-epoch training, export)"
    ctr=$(bh from --pull=never "$TRAINER")
    CONTAINERS+=("$ctr")
    in_image "$ctr" '
        echo "user $(id -u):$(id -g), python3 is $(command -v python3)"
        bockd pipeline compile -o /check/pipeline.yaml
        python3 /check/kfp_component.py /check/pipeline.yaml prepare-data /check/prepare-data.json
        bockd train --preset smoke --epochs 1 --workdir /check/run --progress log
        bockd export --run /check/run --student 4 --out /check/student-s4
        ls -l /check/student-s4
        python3 /check/reference.py /check/student-s4 /check/prepare-data.json /check/reference.json' \
        --volume "$check:/check" --volume "$check/s3:/s3"
    record "trainer check (working container, compile, prepare-data, 1-epoch training, export, reference):" \
        "$((SECONDS - start)) s"
}

check_serving() {
    local check=$1 ctr ready start=$SECONDS
    log "check: $SERVING (the runtime's command line, V1 + V2 on 127.0.0.1)"
    bh inspect --type image "$SERVING" > "$check/serving-image.json" # its ENTRYPOINT, read by serve.py
    ctr=$(bh from --pull=never "$SERVING")
    CONTAINERS+=("$ctr")
    in_image "$ctr" "python /check/serve.py /check/serving-image.json /check/serving-runtime.yaml \
        $MODEL_NAME /check/prepare-data.json /check/reference.json /check/serve.json" \
        --volume "$check:/check" --volume "$check/s3:/s3:ro" --volume "$check/student-s4:/mnt/models:ro"
    ready=$(tr -d '\n ' < "$check/serve.json" | sed -n 's/.*"ready_s":\[\([0-9.,]*\)\].*/\1/p')
    record "serving check: ready ${ready} s after the entrypoint started, 3 starts (GET" \
        "/v2/models/$MODEL_NAME/ready = 200); V1 + V2 = the torch answer; whole check $((SECONDS - start)) s"
}

# check = check-trainer (a fresh $WORK/check) + check-serving (which uses what check-trainer left there).
check() {
    local what=$1 check=$WORK/check
    if [[ $what != check-serving ]]; then
        rm -rf "$check"
        mkdir -p "$check/s3"
    fi
    [[ -f $check/student-s4/model.onnx || $what != check-serving ]] || die "run check-trainer first"
    cp images/check/*.py manifests/base/serving-runtime.yaml "$check/"
    chmod -R a+rwX "$check" # the images run as uid 1000; /s3 stands for the launcher's scratch volume
    [[ $what == check-serving ]] || check_trainer "$check"
    [[ $what == check-trainer ]] || check_serving "$check"
}

main() {
    local what=${1:-all}
    preflight
    case $what in
        all | base | build | check | check-trainer | check-serving) ;;
        *) die "unknown step '$what' (all, base, build, check, check-trainer or check-serving)" ;;
    esac
    printf '# images/build.sh %s, %s\n' "$what" "$(date -u +%FT%TZ)" >> "$REPORT"
    [[ $what == all || $what == base || $what == build ]] && make_base
    if [[ $what == all || $what == build ]]; then
        local image
        for image in $IMAGES; do
            case $image in
                serving) build_one serving "$SERVING" ;;
                trainer) build_one trainer "$TRAINER" ;;
                *) die "IMAGES: unknown image '$image' (serving, trainer)" ;;
            esac
        done
    fi
    [[ $what == all ]] && check check
    [[ $what == check* ]] && check "$what"
    log "done; report: $REPORT"
}

# On one line: bash reads a script while it runs it, and an edit to this file during a long build must not
# make the running one go on with whatever text then follows.
main "$@"; exit "$?"
