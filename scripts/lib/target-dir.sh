# Where cargo builds (sourced, not run): `target/` unless CARGO_TARGET_DIR
# or a cargo config says otherwise, as cargo itself reports it.
target_dir=$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
target_dir=${target_dir:-$PWD/target}
