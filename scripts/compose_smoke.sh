#!/usr/bin/env bash
# Build the RISE-serve images and run the docker-compose stack on THIS machine, end to end:
# every model service answers gRPC health, and the trainer runs RL in imagination against them.
#
#   sudo scripts/compose_smoke.sh            # a first run takes 20-40 min on 2 cores (see bench/RESULTS.md)
#   scripts/compose_smoke.sh --keep          # leave the stack and dockerd running afterwards
#   scripts/compose_smoke.sh --down          # stop a kept stack and its dockerd
#   SMOKE_BUILD=0 scripts/compose_smoke.sh   # reuse the images of the last run (no rebuild)
#
# This machine's constraints, and how they are met:
# - Debian's docker.io runs as `dockerd --bridge=none --iptables=false --storage-driver vfs`
#   (its own data root and socket under $SMOKE_WORK, so no other Docker is touched): containers
#   get host networking, so the services use their own ports (SMOKE_*_PORT) on 127.0.0.1.
# - No registry pulls: the base image is Debian bookworm from debootstrap (with the system
#   libraries the Dockerfiles would apt-get: EGL/Mesa, libusb, and redis-server, which also serves
#   as the Redis image) plus the pyenv Python 3.12 copied in (bookworm's Python is 3.11).
# - Builds have no network of their own: the wheels of the image's lock subset are fetched on the
#   host with `pip download --require-hashes` and served to the builds over 127.0.0.1.
# - vfs copies every layer whole: the Dockerfile keeps the big layers few.
# Results (phases, wall times, image sizes) go to $SMOKE_WORK/result.json and stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${SMOKE_WORK:-/var/tmp/rise-smoke}
PY312=${PY312:-$(ls -1d "$HOME"/.pyenv/versions/3.12.* 2>/dev/null | sort -V | tail -n 1)}
BASE_IMAGE=rise-base:py3.12-bookworm
PROJECT=risesmoke
WHEEL_PORT=${SMOKE_WHEEL_PORT:-18765}
POLICY_PORT=${SMOKE_POLICY_PORT:-51051}
VALUE_PORT=${SMOKE_VALUE_PORT:-51052}
DYNAMICS_PORT=${SMOKE_DYNAMICS_PORT:-51053}
REDIS_PORT=${SMOKE_REDIS_PORT:-16390}
RL_STEPS=${SMOKE_RL_STEPS:-12}
DOCKER=/usr/bin/docker  # Debian's client, the daemon's version
export DOCKER_HOST="unix://$WORK/docker/docker.sock"
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
# vfs copies the whole image (7 GB) to create a container: longer than compose's 60 s API timeout.
export COMPOSE_HTTP_TIMEOUT=900
KEEP=0
BUILD=${SMOKE_BUILD:-1}
case "${1:-}" in
  --keep) KEEP=1 ;;
  --down) MODE=down ;;
  "") ;;
  *) echo "usage: $0 [--keep | --down]" >&2; exit 2 ;;
esac

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
START=$(date +%s)
declare -A PHASE
phase() { PHASE[$1]=$(( $(date +%s) - $2 )); log "$1 took ${PHASE[$1]} s"; }

# Builds read a frozen copy of the tree: others may edit it meanwhile, and one image's cache must
# serve the next.
CTX="$WORK/context"
compose() {  # the project's compose file without published ports (see "the smoke override" below)
  docker-compose -p "$PROJECT" -f "$CTX/docker-compose.smoke-base.yml" -f "$WORK/compose.smoke.yml" "$@"
}

dockerd_up() { $DOCKER info >/dev/null 2>&1; }

stop_dockerd() {
  if [ -f "$WORK/docker/dockerd.pid" ]; then
    kill "$(cat "$WORK/docker/dockerd.pid")" 2>/dev/null || true
    for _ in $(seq 1 30); do dockerd_up || break; sleep 1; done
  fi
}

if [ "${MODE:-}" = down ]; then
  dockerd_up && compose down -v --remove-orphans || true
  stop_dockerd
  exit 0
fi

# ---- tools -------------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
[ -n "$PY312" ] && [ -x "$PY312/bin/python3.12" ] || { echo "no Python 3.12 under ~/.pyenv/versions (set PY312)" >&2; exit 1; }

# ---- the daemon --------------------------------------------------------------------------------
mkdir -p "$WORK/docker"
STARTED_DOCKERD=0
if ! dockerd_up; then
  log "starting dockerd (vfs, no bridge) with data root $WORK/docker/data"
  dockerd --bridge=none --iptables=false --ip-masq=false --storage-driver vfs \
    --data-root "$WORK/docker/data" --exec-root "$WORK/docker/exec" --pidfile "$WORK/docker/dockerd.pid" \
    -H "$DOCKER_HOST" >"$WORK/docker/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do dockerd_up && break; sleep 1; done
  dockerd_up || { tail -20 "$WORK/docker/dockerd.log" >&2; exit 1; }
  STARTED_DOCKERD=1
fi

WHEEL_SERVER=""
cleanup() {
  [ -n "$WHEEL_SERVER" ] && kill "$WHEEL_SERVER" 2>/dev/null || true
  if [ "$KEEP" = 0 ]; then
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    [ "$STARTED_DOCKERD" = 1 ] && stop_dockerd
  fi
}
trap cleanup EXIT

# ---- the base image: debootstrap + Python 3.12 --------------------------------------------------
t=$(date +%s)
if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  rootfs="$WORK/rootfs"
  rm -rf "$rootfs"
  log "debootstrap bookworm into $rootfs"
  debootstrap --variant=minbase \
    --include=ca-certificates,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,libreadline8,libncursesw6,zlib1g,libuuid1,libexpat1,libgdbm6,libegl1,libgl1,libgl1-mesa-dri,libusb-1.0-0,redis-server \
    bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1
  log "copying Python from $PY312"
  cp -a "$PY312"/bin "$PY312"/include "$PY312"/lib "$rootfs/usr/local/"
  rm -rf "$rootfs"/usr/local/lib/python3.12/{test,idlelib,tkinter,turtledemo} "$rootfs"/usr/local/lib/python3.12/site-packages/* \
         "$rootfs"/usr/local/lib/python3.12/config-3.12-*/*.a "$rootfs"/usr/local/bin/{pip,idle,2to3}*
  find "$rootfs/usr/local/lib/python3.12" -name __pycache__ -prune -exec rm -rf {} +
  ln -sf python3.12 "$rootfs/usr/local/bin/python3"
  ln -sf python3.12 "$rootfs/usr/local/bin/python"
  chroot "$rootfs" /sbin/ldconfig  # libpython3.12.so from /usr/local/lib (pyenv's RUNPATH points elsewhere)
  chroot "$rootfs" /usr/local/bin/python3.12 -c "import ssl, sqlite3, ctypes, venv, ensurepip, zlib, bz2, lzma"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | $DOCKER import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi
phase base_image "$t"

# ---- a frozen copy of the tree ----------------------------------------------------------------------
rsync -a --delete --exclude .git --exclude .venv --exclude build --exclude model_store --exclude runs \
  --exclude .demo --exclude __pycache__ "$ROOT/" "$CTX/"

# ---- the wheelhouse, served on 127.0.0.1 ----------------------------------------------------------
t=$(date +%s)
mkdir -p "$WORK/wheelhouse"
python3 "$CTX/docker/lock_subset.py" --extras ml,data,triton "$CTX/requirements.lock" >"$WORK/req-services.txt"
python3 "$CTX/docker/lock_subset.py" --extras agent "$CTX/requirements.lock" >"$WORK/req-agent.txt"
stamp=$(cat "$WORK/req-services.txt" "$WORK/req-agent.txt" | sha256sum | cut -d' ' -f1)
if [ "$BUILD" = 1 ] && [ "$(cat "$WORK/wheelhouse/.complete" 2>/dev/null)" != "$stamp" ]; then
log "pip download (hash-checked) into $WORK/wheelhouse"
# Every glibc a wheel may ask for up to bookworm's 2.36 (the CUDA wheels use 2_25 and 2_27).
PLATFORMS=$(for v in $(seq 17 36); do printf -- '--platform manylinux_2_%s_x86_64 ' "$v"; done)
if ! "$PY312/bin/python3.12" -m pip download --no-deps --require-hashes --only-binary=:all: --python-version 3.12 \
  $PLATFORMS --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any \
  -d "$WORK/wheelhouse" -r "$WORK/req-services.txt" -r "$WORK/req-agent.txt" >"$WORK/download.log" 2>&1; then
  tail -20 "$WORK/download.log" >&2; exit 1
fi
  echo "$stamp" >"$WORK/wheelhouse/.complete"
fi
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/wheelhouse" "$WHEEL_PORT" >"$WORK/wheels-http.log" 2>&1 &
WHEEL_SERVER=$!
phase wheelhouse "$t"

# ---- the smoke override: host networking, local base image, the wheelhouse -----------------------
# Host networking cannot publish ports, and an override file can add `ports:` but not remove them:
# the stack runs from a copy of docker-compose.yml without them (beside it, so build contexts hold).
"$ROOT/.venv/bin/python" - "$CTX/docker-compose.yml" "$CTX/docker-compose.smoke-base.yml" <<'EOF'
import sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
for service in compose["services"].values():
    service.pop("ports", None)
yaml.safe_dump(compose, open(sys.argv[2], "w"), sort_keys=False)
EOF
svc_build() {  # the build section of one service: SERVICE=$1
  cat <<EOF
    build:
      network: host
      args:
        BASE_IMAGE: $BASE_IMAGE
        SYSTEM_PACKAGES: ""
        PIP_NO_INDEX: "1"
        PIP_FIND_LINKS: http://127.0.0.1:$WHEEL_PORT/
        SERVICE: $1
EOF
}
{
  echo "# generated by scripts/compose_smoke.sh"
  echo "services:"
  echo "  redis:"
  echo "    image: $BASE_IMAGE"
  echo "    network_mode: host"
  echo "    command: [redis-server, --port, \"$REDIS_PORT\", --bind, 127.0.0.1, --save, \"\", --appendonly, \"no\"]"
  echo "  init:"
  echo "    network_mode: host"
  svc_build trainer
  for s in policy value dynamics; do
    echo "  $s:"
    echo "    network_mode: host"
    echo "    environment: {RISE_SERVER__HOST: 127.0.0.1}"
    svc_build "$s"
  done
  echo "  trainer:"
  echo "    network_mode: host"
  svc_build trainer
} >"$WORK/compose.smoke.yml"
export REDIS_PORT POLICY_PORT VALUE_PORT DYNAMICS_PORT RL_STEPS RISE_TAG=smoke
export POLICY_URL="grpc://127.0.0.1:$POLICY_PORT" VALUE_URL="grpc://127.0.0.1:$VALUE_PORT"
export DYNAMICS_URL="grpc://127.0.0.1:$DYNAMICS_PORT" REPLAY_URL="redis://127.0.0.1:$REDIS_PORT/0"
compose config -q

# ---- build -------------------------------------------------------------------------------------------
t=$(date +%s)
if [ "$BUILD" = 1 ]; then
log "building the service images (first build: the locked environment, then cache hits)"
compose build policy >"$WORK/build-policy.log" 2>&1 || { tail -40 "$WORK/build-policy.log" >&2; exit 1; }
compose build value dynamics trainer init >"$WORK/build-others.log" 2>&1 || { tail -40 "$WORK/build-others.log" >&2; exit 1; }
fi
phase build_services "$t"
t=$(date +%s)
AGENT="skipped: robot_agent/ is not in the tree"
[ "$BUILD" = 1 ] || AGENT="not rebuilt (SMOKE_BUILD=0): the last run's image"
if [ "$BUILD" = 1 ] && [ -d "$CTX/robot_agent" ]; then
  if $DOCKER build --network host -f "$CTX/docker/agent.Dockerfile" -t rise-agent:smoke \
       --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg SYSTEM_PACKAGES= --build-arg PIP_NO_INDEX=1 \
       --build-arg PIP_FIND_LINKS="http://127.0.0.1:$WHEEL_PORT/" "$CTX" >"$WORK/build-agent.log" 2>&1; then
    AGENT="built; $($DOCKER run --rm --network none rise-agent:smoke --help >/dev/null 2>&1 && echo 'rise-agent --help runs' || echo 'rise-agent --help FAILED')"
  else
    AGENT="build FAILED (see $WORK/build-agent.log)"
  fi
fi
phase build_agent "$t"
kill "$WHEEL_SERVER" 2>/dev/null || true
WHEEL_SERVER=""
# vfs stores every layer as a whole copy and every container as one more: the build stages'
# images (~20 GB here: the 6.6 GB environment in three layers) go before five containers copy the
# service image again. The next build then starts over (SMOKE_BUILD=0 reuses the images instead).
[ "$BUILD" = 1 ] && $DOCKER image prune -f >/dev/null

# ---- up ------------------------------------------------------------------------------------------------
# In the order `docker-compose up` follows (redis, init, the model services once init succeeded,
# the trainer once they are healthy), step by step: vfs makes every container a whole copy of its
# image (7 GB), so the finished init container is removed before the next four are created.
t=$(date +%s)
log "docker-compose up -d redis init (init fills the model store)"
compose up -d redis init >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; compose logs --tail 50 >&2; exit 1; }
init_code=$($DOCKER wait "$(compose ps -q init)")
compose logs --no-color init >"$WORK/init.log" 2>&1 || true
[ "$init_code" = 0 ] || { log "init exited with $init_code"; tail -40 "$WORK/init.log" >&2; exit 1; }
compose rm -f init >/dev/null
phase init "$t"
t=$(date +%s)
log "docker-compose up -d policy value dynamics"
compose up -d --no-deps policy value dynamics >>"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; compose logs --tail 50 >&2; exit 1; }
phase up "$t"

status_of() { $DOCKER inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1" 2>/dev/null; }
t=$(date +%s)
for s in policy value dynamics; do
  cid=$(compose ps -q "$s")
  for _ in $(seq 1 180); do
    [ "$(status_of "$cid")" = healthy ] && break
    sleep 2
  done
  [ "$(status_of "$cid")" = healthy ] || { log "$s is $(status_of "$cid")"; compose logs --tail 40 "$s" >&2; exit 1; }
done
phase healthy "$t"
HEALTH=""
for s in policy:$POLICY_PORT value:$VALUE_PORT dynamics:$DYNAMICS_PORT; do
  HEALTH+="$("$ROOT/.venv/bin/rise" health "127.0.0.1:${s#*:}" 2>&1 || true) (${s%%:*}); "
done
log "health from the host: $HEALTH"

t=$(date +%s)
compose up -d --no-deps trainer >>"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; exit 1; }
tid=$(compose ps -q trainer)
log "waiting for the trainer run ($RL_STEPS learner steps of RL in imagination)"
code=$($DOCKER wait "$tid")
phase trainer_run "$t"
compose logs --no-color trainer >"$WORK/trainer.log" 2>&1 || true
RUN=$(grep -E '^trainer.*\{"run_id"' "$WORK/trainer.log" | tail -n 1 | sed 's/^[^{]*//')
log "trainer exit code $code: $RUN"
MODELS=$($DOCKER run --rm --network none -v "${PROJECT}_models:/models" "rise-trainer:smoke" rise models list 2>&1 | tail -n 20 || true)

SIZES=$($DOCKER image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'rise-|risesmoke' | sort -u)
TOTAL=$(( $(date +%s) - START ))
export SMOKE_CODE="$code" SMOKE_RUN="$RUN" SMOKE_HEALTH="$HEALTH" SMOKE_AGENT="$AGENT" SMOKE_SIZES="$SIZES" SMOKE_TOTAL="$TOTAL"
SMOKE_PHASES="$(for k in "${!PHASE[@]}"; do printf '%s=%s ' "$k" "${PHASE[$k]}"; done)"
export SMOKE_PHASES
python3 - "$WORK/result.json" <<'EOF'
import json, os, sys
env = os.environ
result = {
    "trainer_exit_code": int(env["SMOKE_CODE"]),
    "run": json.loads(env["SMOKE_RUN"]) if env["SMOKE_RUN"] else None,
    "health": env["SMOKE_HEALTH"].strip(), "agent_image": env["SMOKE_AGENT"],
    "phases_s": {k: int(v) for k, v in (p.split("=") for p in env["SMOKE_PHASES"].split())},
    "total_s": int(env["SMOKE_TOTAL"]), "images": env["SMOKE_SIZES"].splitlines(),
}
json.dump(result, open(sys.argv[1], "w"), indent=2)
print(json.dumps(result, indent=2))
EOF
echo "$MODELS"
[ "$code" = 0 ] || exit 1
