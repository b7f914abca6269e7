#!/usr/bin/env bash
# run_cargo.sh MODE CARGO SRCDIR BUILDDIR
# cargo test --offline for rust/moekit-sys and rust/moekit, linked against BUILDDIR's libmoekit
# through pkg-config (meson's moekit-uninstalled.pc, which pkg-config prefers when it is on the
# path), with the target directory inside the build directory. Exit 77 (SKIP) without cargo.
# MODE cpu: every test that needs no device (the GPU tests are #[ignore]d and listed as ignored);
# MODE gpu: only rust/moekit's GPU tests (-- --ignored), SKIP when they found no GPU.
set -u
mode=$1
shift
cargo=$1 src=$2 build=$3
if [ -z "$cargo" ] || ! "$cargo" --version >/dev/null 2>&1; then
  echo "SKIP: cargo is not installed"
  exit 77
fi
export CARGO_TARGET_DIR=$build/rust-target
export PKG_CONFIG_PATH=$build/meson-uninstalled${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
export MOEKIT_INCLUDE_DIR=$src/include
unset MOEKIT_LIB_DIR  # the pkg-config path is the one under test
case $mode in
  cpu)
    for crate in moekit-sys moekit; do
      echo "=== cargo test --offline ($crate)"
      "$cargo" test --offline --manifest-path "$src/rust/$crate/Cargo.toml" || exit 1
    done ;;
  gpu)
    echo "=== cargo test --offline --test gpu -- --ignored (moekit)"
    out=$("$cargo" test --offline --manifest-path "$src/rust/moekit/Cargo.toml" --test gpu -- --ignored \
          --show-output 2>&1)
    rc=$?
    echo "$out"
    [ $rc -eq 0 ] || exit 1
    if echo "$out" | grep -q "skipped: no GPU"; then
      echo "SKIP: no CUDA device answered; the Rust GPU tests did not run"
      exit 77
    fi ;;
  *) echo "run_cargo.sh: MODE must be cpu or gpu, got '$mode'" >&2; exit 2 ;;
esac
