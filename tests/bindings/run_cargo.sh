#!/usr/bin/env bash
# run_cargo.sh CARGO SRCDIR BUILDDIR
# cargo test --offline for rust/moekit-sys and rust/moekit, linked against BUILDDIR's libmoekit
# through pkg-config (meson's moekit-uninstalled.pc, which pkg-config prefers when it is on the
# path), with the target directory inside the build directory. Exit 77 (SKIP) without cargo.
set -u
cargo=$1 src=$2 build=$3
if [ -z "$cargo" ] || ! "$cargo" --version >/dev/null 2>&1; then
  echo "SKIP: cargo is not installed"
  exit 77
fi
export CARGO_TARGET_DIR=$build/rust-target
export PKG_CONFIG_PATH=$build/meson-uninstalled${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export MOEKIT_INCLUDE_DIR=$src/include
unset MOEKIT_LIB_DIR  # the pkg-config path is the one under test
for crate in moekit-sys moekit; do
  echo "=== cargo test --offline ($crate)"
  # --show-output: the "skipped: no GPU" lines of passing tests reach the log.
  "$cargo" test --offline --manifest-path "$src/rust/$crate/Cargo.toml" -- --show-output || exit 1
done
