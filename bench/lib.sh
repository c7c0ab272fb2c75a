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

# serve_stored_stub PORT STUB_PORT DIR [ADMIN_PORT [BINARY]]: a fixed-answer upstream on
# STUB_PORT (`loadtest stub`) and a gateway (BINARY, default the release build) on PORT
# routing to it, storing answers in DIR/responses.db, its admin API on ADMIN_PORT if given
# (the demo admin token); the demo key's tenant `bench`. Returns once it is ready.
serve_stored_stub() {
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\n' "$1"
    if [ -n "${4:-}" ]; then
      printf 'admin_listen = "127.0.0.1:%s"\n' "$4"
      printf 'admin_token_sha256 = "89fc741a02ccba763dd23dad9bbcbeab2e95fef69c0a4bab66317295ac2dab1f"\n'
    fi
    cat <<TOML
[[models]]
id = "stub"
[[pools]]
name = "stub"
model = "stub"
workers = [{ kind = "openai", url = "http://127.0.0.1:$2" }]
[metering]
enabled = false
[responses]
store = true
path = "$3/responses.db"
[[tenants]]
id = "bench"
keys_sha256 = ["179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"]
TOML
  } > "$3/gw.toml"
  ./target/release/loadtest stub --listen "127.0.0.1:$2" > /dev/null &
  RUST_LOG=warn "${5:-./target/release/gateway}" serve --config "$3/gw.toml" > "$3/gw.log" 2>&1 &
  wait_ready "$1"
}
