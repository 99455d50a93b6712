#!/usr/bin/env bash
# Glue between ../shared/bench's JSON-spec adapter and the mariesync CLI.
# Homes are {work}/home-A and {work}/home-B (the harness's {home}).
set -euo pipefail
bin=${MARIESYNC_BIN:-target/release/mariesync}
ms() { local home=$1; shift; "$bin" --home "$home" "$@"; }
case $1 in
daemon) # HOME PORT: exec, so the harness measures the daemon itself
  exec "$bin" --home "$2" daemon --listen "/ip4/127.0.0.1/tcp/$3" --no-mdns ;;
ready) # HOME
  ms "$2" id >/dev/null 2>&1 ;;
begin) # SIDE WORK DIR PEER_DIR PORT PEER_PORT: all of it from side A
  [ "$2" = A ] || exit 0
  work=$3 a=$3/home-A b=$3/home-B
  id_a=$(ms "$a" id) id_b=$(ms "$b" id)
  ms "$a" peer add "$id_b" --addr "/ip4/127.0.0.1/tcp/$7" >/dev/null
  ms "$b" peer add "$id_a" --addr "/ip4/127.0.0.1/tcp/$6" >/dev/null
  ws=$(ms "$a" --json workspace add "$4" --name bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["workspace_id"])')
  ms "$a" share bench "$id_b" --role editor >/dev/null
  for _ in $(seq 1 3000); do
    if ms "$b" --json workspace list | grep -q '"offered"'; then break; fi
    sleep 0.01
  done
  ms "$b" workspace add "$5" --id "$ws" >/dev/null ;;
in-sync) # WORK: A's changes are stored and acknowledged by B
  timeout 5 "$bin" --home "$2/home-A" flush bench >/dev/null ;;
stop) # HOME
  ms "$2" stop >/dev/null ;;
*) echo "unknown command $1" >&2; exit 2 ;;
esac
