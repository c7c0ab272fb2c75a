# Shared by the bench scripts (sourced): the quick-start gateway's config for a benchmark,
# starting a gateway on it, and waiting for a gateway to be ready.

# quickstart_config PORT ENGINE_FIELDS DIR: config/gateway.toml on 127.0.0.1:PORT, without
# the admin listener, the engine worker's fields extended by ENGINE_FIELDS (", a = b, …"),
# its usage database in DIR, and the demo tenant's contract lifted (the engine is what is
# measured). Written to DIR/gw.toml; fails if the engine's fields were not set.
quickstart_config() {
  sed -e "s/127.0.0.1:8080/127.0.0.1:$1/" -e 's/^admin_listen.*//' \
      -e "s/{ kind = \"engine\", backend = \"auto\" }/{ kind = \"engine\", backend = \"auto\"$2 }/" \
      -e 's|^path = "tollgate-usage.db".*|path = "'"$3"'/usage.db"|' \
      -e 's/^tokens_per_second = .*/tokens_per_second = 1000000.0/' \
      -e 's/^requests_per_minute = .*/requests_per_minute = 1000000/' \
      config/gateway.toml > "$3/gw.toml"
  grep -qF "backend = \"auto\"$2 }" "$3/gw.toml" || { echo "could not set the engine's fields" >&2; exit 1; }
}

# wait_ready PORT: until the gateway there answers /ready (at most a minute).
wait_ready() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$1/ready" > /dev/null && return 0
    sleep 0.1
  done
  echo "the gateway on port $1 did not get ready" >&2
  exit 1
}

# serve_quickstart PORT DIR [BINARY]: BINARY (default: the release build) serving DIR/gw.toml
# in the background, its log in DIR/gw.log; returns once it is ready, its pid in GW_PID.
serve_quickstart() {
  "${3:-./target/release/gateway}" serve --config "$2/gw.toml" > "$2/gw.log" 2>&1 &
  GW_PID=$!
  wait_ready "$1"
}
