//! The tests and examples of this crate run against the libmoekit that moekit-sys linked: add an
//! rpath to its directory (moekit-sys publishes it as DEP_MOEKIT_LIB_DIR).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MOEKIT_LIB_DIR");
    if let Ok(dirs) = std::env::var("DEP_MOEKIT_LIB_DIR") {
        for dir in dirs.split(':').filter(|d| !d.is_empty()) {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
