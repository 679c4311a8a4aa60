# Shared by the bench scripts (sourced from the repository root).

# oha, the load generator: on PATH or where `cargo install` puts it.
oha_bin="$(command -v oha || echo "$HOME/.cargo/bin/oha")"
require_oha() {
  [ -x "$oha_bin" ] || { echo "oha is missing: cargo install oha --locked" >&2; exit 2; }
}

# upstream_conf DIR PORT: writes DIR/nginx.conf, an nginx that answers `ok` on 127.0.0.1:PORT
# (one worker, keep-alive without limit); run it with `nginx -c DIR/nginx.conf -p DIR`.
upstream_conf() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http { access_log off;
  server { listen 127.0.0.1:$port; keepalive_requests 1000000; location / { return 200 "ok\n"; } } }
CONF
}
