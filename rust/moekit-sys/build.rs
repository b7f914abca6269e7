//! Finds libmoekit for linking, in order:
//!   1. MOEKIT_LIB_DIR: the directory holding libmoekit.so (an explicit choice always wins);
//!   2. `pkg-config --libs moekit` (an installed moekit, or a build tree through meson's
//!      meson-uninstalled/moekit-uninstalled.pc on PKG_CONFIG_PATH, which pkg-config prefers);
//!   3. the repository's build/ directory next to this crate (../../build).
//!
//! Emits the link search path, `-lmoekit`, an rpath to the directory for this crate's tests, and
//! `cargo:lib_dir=...` so that dependents read it as DEP_MOEKIT_LIB_DIR.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn from_pkg_config() -> Option<Vec<String>> {
    let out = Command::new(env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into()))
        .args(["--libs", "moekit"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut dirs = Vec::new();
    let mut links_moekit = false;
    for token in text.split_whitespace() {
        if let Some(dir) = token.strip_prefix("-L") {
            dirs.push(dir.to_string());
        } else if token == "-lmoekit" {
            links_moekit = true;
        }
    }
    links_moekit.then_some(dirs)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["MOEKIT_LIB_DIR", "PKG_CONFIG_PATH", "PKG_CONFIG"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let repo_build = manifest.join("../../build");
    let (dirs, how) = if let Ok(dir) = env::var("MOEKIT_LIB_DIR") {
        (vec![dir], "MOEKIT_LIB_DIR")
    } else if let Some(dirs) = from_pkg_config() {
        (dirs, "pkg-config")
    } else if repo_build.join("libmoekit.so").exists() {
        (vec![repo_build.to_string_lossy().into_owned()], "the repository's build/")
    } else {
        panic!(
            "libmoekit not found: set MOEKIT_LIB_DIR to the directory holding libmoekit.so, put \
             moekit.pc on PKG_CONFIG_PATH, or build the repository into build/"
        );
    };
    for dir in &dirs {
        if !Path::new(dir).join("libmoekit.so").exists() {
            println!("cargo:warning=moekit-sys: {how} gave {dir}, which holds no libmoekit.so");
        }
        println!("cargo:rustc-link-search=native={dir}");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rustc-link-lib=dylib=moekit");
    println!("cargo:lib_dir={}", dirs.join(":"));
}
