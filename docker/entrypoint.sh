#!/bin/sh
# Entry point of the RISE-serve images.
#
#   serve [ARGS]   (the default) `rise serve $SERVICE [ARGS]`; with SERVICE_CONFIG set, its YAML
#                  is passed as --config (RISE_* variables still override it). For a model service,
#                  MODEL_VERSION=v0003 (or an alias) pins the alias MODEL_ALIAS (default: stable)
#                  to it in this server (`pin` in the service config), so it serves that version
#                  by default: one variable per service picks its version. The shared registry's
#                  aliases are left alone (other services or replicas may pin others).
#   health         exit 0 when this container's server answers gRPC health SERVING (HEALTHCHECK).
#   anything else  run as given, e.g. `rise models list` or `rise train rise --config ...`.
set -eu

service=${SERVICE:-}

default_port() {
  case "$1" in
    policy) echo 50051 ;;
    value) echo 50052 ;;
    dynamics) echo 50053 ;;
    trainer) echo 50054 ;;
    *) echo "entrypoint: SERVICE must be policy, value, dynamics or trainer, got '$1'" >&2; exit 2 ;;
  esac
}

case "${1:-serve}" in
  serve)
    [ "$#" -gt 0 ] && shift
    port=${RISE_SERVER__PORT:-$(default_port "$service")}
    export RISE_SERVER__PORT="$port"
    if [ -n "${MODEL_VERSION:-}" ] && [ "$service" != trainer ]; then
      export RISE_PIN="{\"${MODEL_ALIAS:-stable}\": \"$MODEL_VERSION\"}"
    fi
    if [ -n "${SERVICE_CONFIG:-}" ]; then
      exec rise serve "$service" --config "$SERVICE_CONFIG" "$@"
    fi
    exec rise serve "$service" "$@"
    ;;
  health)
    port=${RISE_SERVER__PORT:-$(default_port "$service")}
    exec rise health "127.0.0.1:$port" --timeout "${HEALTH_TIMEOUT_S:-10}"
    ;;
  *)
    exec "$@"
    ;;
esac
