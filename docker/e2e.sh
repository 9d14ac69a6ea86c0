#!/usr/bin/env bash
# End-to-end test of the docker-compose cluster with real clients. Every
# step is asserted; everything the test creates (containers, networks,
# volumes, test images, its berth image tag) is removed on exit, pass or fail.
# It uses its own compose project name and host port, so it cannot touch a
# cluster a user is running.
#   BERTH_BIN=target/release/berth BERTH_PORT=5090 docker/e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."
E2E_NAME=e2e E2E_PORT=5090
# shellcheck source=docker/e2e-lib.sh
source docker/e2e-lib.sh
REG="127.0.0.1:$BERTH_PORT"
# Garbage collection's grace period in this cluster (see the gc step).
export BERTH_GC_GRACE_SECS=5
cleanup() {
  dc --profile join down -v --remove-orphans >/dev/null 2>&1 || true
  for i in app:1 app:2 app:3 copy:1; do docker rmi -f "$REG/e2e/$i" >/dev/null 2>&1 || true; done
  # Every image this run built, including ones a rebuilt tag left untagged.
  docker images -q --filter "label=berth-e2e=$P" | sort -u | xargs -r docker rmi -f >/dev/null 2>&1 || true
  docker rmi -f "$BERTH_IMAGE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

leader_of() { status_json "$1" | python3 -c 'import json,sys; rows=json.load(sys.stdin); print(next(r["leader"] for r in rows if r["answers"] and r["leader"]))'; }
healthy() { curl -sf "http://$REG/v2/" >/dev/null && [ "$(count_answering "$1")" = "$2" ]; }

round_trip() { # push, remove, pull back, compare ids
  local id; id=$(image_id "$1")
  docker push "$1" >/dev/null || fail "docker push $1"
  docker rmi "$1" >/dev/null
  docker pull "$1" >/dev/null || fail "docker pull $1"
  [ "$(image_id "$1")" = "$id" ] || fail "image id of $1 changed through the registry"
}
pull_again() { docker rmi "$1" >/dev/null 2>&1 || true; docker pull "$1" >/dev/null || fail "pull $1"; }

step "building images (offline path)"
t=$(date +%s); docker/build-images.sh "$BIN" >/dev/null || fail "image build"
step "images built in $(( $(date +%s) - t ))s; berth image $(docker image inspect --format '{{.Size}}' "$BERTH_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

docker/certs.sh "$BIN" || fail "certificates"
t=$(date +%s); dc up -d >/dev/null 2>&1 || fail "compose up"
wait_until "cluster healthy" 90 healthy node1 3
step "compose up and healthy in $(( $(date +%s) - t ))s"

make_image "$REG/e2e/app:1" one
round_trip "$REG/e2e/app:1"
step "docker push/pull through the load balancer: ok"

if command -v skopeo >/dev/null; then
  skopeo copy -q --src-tls-verify=false "docker://$REG/e2e/app:1" "oci:$WORK/layout:app" || fail "skopeo copy out"
  skopeo copy -q --dest-tls-verify=false "oci:$WORK/layout:app" "docker://$REG/e2e/copy:1" || fail "skopeo copy in"
  a=$(skopeo inspect --tls-verify=false --format '{{.Layers}}' "docker://$REG/e2e/app:1")
  b=$(skopeo inspect --tls-verify=false --format '{{.Layers}}' "docker://$REG/e2e/copy:1")
  [ "$a" = "$b" ] || fail "skopeo round trip changed layers"
  step "skopeo copy in and out: ok"
  # Nodes read blobs from each other on the cluster port; the public port has
  # no internal route a client could use.
  layer=$(echo "$a" | tr -d '[]' | cut -d' ' -f1)
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://$REG/_berth/blobs/$layer")
  [ "$code" = 404 ] || fail "the load balancer passes /_berth/ to the nodes (HTTP $code for $layer)"
else
  step "SKIPPED skopeo steps: skopeo not installed"
fi

leader=$(leader_of node1)
follower=$(( leader % 3 + 1 ))
step "killing follower node$follower (leader is node$leader)"
dc kill "node$follower" >/dev/null 2>&1
make_image "$REG/e2e/app:2" two
round_trip "$REG/e2e/app:2"
pull_again "$REG/e2e/app:1"
other=$(( follower % 3 + 1 ))
status_json "node$other" | python3 -c "
import json,sys
rows=json.load(sys.stdin)
dead=[r for r in rows if r['id']==$follower][0]
assert not dead['answers'], dead
" || fail "cluster status does not show node$follower as down"
step "push and pull with node$follower down: ok; status shows it down"
dc start "node$follower" >/dev/null 2>&1
wait_until "node$follower back" 60 healthy node1 3

leader=$(leader_of node1)
step "killing the leader node$leader"
dc kill "node$leader" >/dev/null 2>&1
survivor=$(( leader % 3 + 1 ))
wait_until "a new leader" 60 bash -c "[ \"\$(docker-compose -p $P exec -T node$survivor berth cluster status --json --node node$survivor:5001 | python3 -c 'import json,sys; print(sum(1 for r in json.load(sys.stdin) if r[\"answers\"] and r[\"leader\"] and r[\"leader\"] != $leader))')\" -ge 2 ]"
make_image "$REG/e2e/app:3" three
round_trip "$REG/e2e/app:3"
pull_again "$REG/e2e/app:1"
step "push and pull after losing the leader: ok"
dc start "node$leader" >/dev/null 2>&1
wait_until "node$leader back" 60 healthy node1 3

step "node4 joins with berth cluster join"
dc --profile join up -d node4 >/dev/null 2>&1 || fail "start node4"
wait_until "node4 up" 60 dc exec -T node4 berth cluster status --node node4:5001
dc exec -T node1 berth cluster join --node node1:5001 --id 4 --addr node4:5001 --api node4:5000 --region west \
  || fail "cluster join"
wait_until "four members answering" 60 healthy node1 4
# Pushes run back to back while node4 leaves: the leave drains node4 (its
# health check fails, so the load balancer stops sending it clients, and
# the leave waits for the requests it already has), moves its blobs'
# copies to the others, then removes it. Every push must succeed.
left="$WORK/left"
( n=0; until [ -e "$left" ] && [ $n -ge 1 ]; do
    n=$((n + 1)); make_image "$REG/e2e/app:2" "two-again-$n"
    docker push "$REG/e2e/app:2" >/dev/null 2>&1 || { echo "e2e: push $n during leave failed" >&2; exit 1; }
  done; echo "e2e: $n pushes during the leave" ) &
pusher=$!
dc exec -T node1 berth cluster leave --node node1:5001 --id 4 || fail "cluster leave"
touch "$left"
wait $pusher || fail "push during leave"
[ "$(status_json node1 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 3 ] || fail "node4 still a member"
dc --profile join stop node4 >/dev/null 2>&1
pull_again "$REG/e2e/app:2"
step "join and leave under a push: ok"

step "compose down (volumes kept) and up again"
dc --profile join down >/dev/null 2>&1
dc up -d >/dev/null 2>&1
wait_until "cluster healthy after restart" 90 healthy node1 3
for i in app:1 app:2 app:3 copy:1; do
  command -v skopeo >/dev/null || [ "$i" != copy:1 ] || continue
  pull_again "$REG/e2e/$i"
done
step "every image survived down/up"

# Garbage collection: delete an image, collect through the cluster, and see
# its bytes leave every node's disk (the grace period is BERTH_GC_GRACE_SECS).
blob_bytes() { dc exec -T "$1" du -sb /data/blobs | cut -f1; }
declare -A before
for n in node1 node2 node3; do before[$n]=$(blob_bytes $n); done
digest=$(curl -sI -H "Accept: application/vnd.docker.distribution.manifest.v2+json" "http://$REG/v2/e2e/app/manifests/3" \
  | awk 'tolower($1) == "docker-content-digest:" { print $2 }' | tr -d '\r')
[ -n "$digest" ] || fail "no digest for e2e/app:3"
code=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "http://$REG/v2/e2e/app/manifests/$digest")
[ "$code" = 202 ] || fail "DELETE e2e/app:3 answered $code"
gc_frees() { dc exec -T node2 berth gc --node node2:5001 > "$WORK/gc.out" 2>&1; grep -q "; freed [1-9]" "$WORK/gc.out"; }
wait_until "berth gc to free the deleted image" 60 gc_frees
sed 's/^/e2e   gc: /' "$WORK/gc.out"
for n in node1 node2 node3; do
  after=$(blob_bytes $n)
  [ $(( ${before[$n]} - after )) -ge 4000000 ] || fail "$n's blob disk went from ${before[$n]} to $after bytes"
  step "$n: blob disk ${before[$n]} -> $after bytes"
done
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Accept: application/vnd.docker.distribution.manifest.v2+json" "http://$REG/v2/e2e/app/manifests/1")
[ "$code" = 200 ] || fail "e2e/app:1 after gc: HTTP $code"
pull_again "$REG/e2e/app:1"
step "delete, berth gc through the cluster, space freed on every node: ok"
echo "e2e: 1 passed, 0 failed"
