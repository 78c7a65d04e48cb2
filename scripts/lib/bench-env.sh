# Shared by the benchmarks that boot busybox VMs (sourced, not run):
# the release build, a busybox image in a local registry, a daemon.
# The caller sets `work` and `cleanup` (which kills $reg_pid and $daemon_pid).

# Builds banger and the agent; sets `banger` and `kernel`.
bench_build() {
  bash scripts/install-deps >/dev/null
  cargo build --release --locked -q -p banger
  . scripts/lib/target-dir.sh
  cp "$(bash scripts/build-agent)" "$target_dir/release/banger-agent"
  banger=$target_dir/release/banger
  kernel=$(bash scripts/fetch-test-kernel)
}

# A busybox image pushed to a registry on loopback as bb:1; sets `port`
# and `reg_pid`.
bench_busybox_registry() {
  local root=$work/root
  mkdir -p "$root/bin" "$root/etc" "$root/tmp"
  cp /bin/busybox "$root/bin/"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"; done
  echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
  tar --numeric-owner -C "$root" -cf "$work/base.tar" .
  LAYER_COMPRESSION=none python3 scripts/oci-layout-from-tars.py "$work/layout" t "$work/base.tar"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  printf 'version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' "$work/reg" "$port" > "$work/reg.yml"
  docker-registry serve "$work/reg.yml" >/dev/null 2>&1 &
  reg_pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
  skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:t" "docker://127.0.0.1:$port/bb:1"
}

# A daemon on `home` with the test kernel and busybox as `bb`; sets `daemon_pid`.
bench_daemon() {
  home=$work/home
  mkdir -p "$home"
  BANGER_HOME=$home "$banger" daemon 2>"$work/daemon.log" &
  daemon_pid=$!
  for _ in $(seq 100); do [ -S "$home/run/banger.sock" ] && break; sleep 0.05; done
  BANGER_HOME=$home "$banger" kernel import "$kernel" >/dev/null
  BANGER_HOME=$home "$banger" image pull "127.0.0.1:$port/bb:1" --name bb >/dev/null
}
