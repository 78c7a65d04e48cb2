# Fully static builds on the gnu target (sourced, not run): the guest agent,
# and the fake Firecracker and jailer, which run inside a jail with no
# dynamic loader. The explicit --target keeps crt-static away from build
# scripts and proc macros; one profile and one set of flags let the builds
# share their compiled dependencies.
static_target=x86_64-unknown-linux-gnu
. "$(dirname "${BASH_SOURCE[0]}")/target-dir.sh"
static_dir=$target_dir/$static_target/agent

# getrandom finds glibc's getrandom() through dlsym, which a static binary
# lacks, and would fall back to opening /dev/urandom (absent for a moment
# while the agent switches root): use the system call directly.
static_build() {
  RUSTFLAGS="-C target-feature=+crt-static --cfg getrandom_backend=\"linux_raw\"" \
    cargo build --locked -q --profile agent --target "$static_target" "$@"
}
