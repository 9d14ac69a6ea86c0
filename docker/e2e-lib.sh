# Helpers shared by the compose end-to-end scripts (docker/e2e.sh,
# docker/e2e-tls.sh); sourced from the repository root, not run. It sets
# BIN (the berth binary, BERTH_BIN), BERTH_PORT (default from the caller's
# E2E_PORT), BERTH_IMAGE and P (a compose project and image tag of this
# run's own, from E2E_NAME), WORK (a scratch dir), T0 (the start time) and
# COMPOSE_FILES (the -f arguments, none until the caller sets them). The
# caller sets REG (host:port of the load balancer).

BIN=${BERTH_BIN:-target/release/berth}
export BERTH_PORT=${BERTH_PORT:-$E2E_PORT}
export BERTH_IMAGE="berth:$E2E_NAME-$$"
P="berth-$E2E_NAME-$$"
WORK=$(mktemp -d)
T0=$(date +%s)
COMPOSE_FILES=()

dc() { docker-compose -p "$P" "${COMPOSE_FILES[@]}" "$@"; }
step() { echo "e2e [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "e2e FAILED: $*" >&2; dc --profile join ps >&2 || true; dc --profile join logs --tail 30 >&2 || true; exit 1; }

# wait_until DESCRIPTION SECONDS COMMAND...
wait_until() {
  local what=$1 secs=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "timed out waiting for $what"
    sleep 0.5
  done
}

status_json() { dc exec -T "$1" berth cluster status --json --node "$1:5001"; }
# count_answering NODE: members that answer, as seen from NODE
count_answering() { status_json "$1" | python3 -c 'import json,sys; print(sum(1 for r in json.load(sys.stdin) if r["answers"]))'; }

make_image() { # make_image TAG SEED: three layers, built FROM scratch
  local ctx="$WORK/ctx-$2"; mkdir -p "$ctx"
  head -c 4000000 /dev/urandom > "$ctx/a"; head -c 60000 /dev/urandom > "$ctx/b"; echo "$2" > "$ctx/c"
  printf 'FROM scratch\nLABEL berth-e2e=%s\nCOPY a /a\nCOPY b /b\nCOPY c /c\n' "$P" > "$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build -q -t "$1" "$ctx" >/dev/null 2>&1 || fail "docker build $1"
}
image_id() { docker inspect --format '{{.Id}}' "$1"; }
