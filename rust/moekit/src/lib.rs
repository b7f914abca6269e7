//! A small safe wrapper over libmoekit, CUDA kernels for Mixture-of-Experts layers behind a C ABI.
//!
//! - Every call returns [`Result`]; an [`Error`] carries the status and the library's message,
//!   which names the entry point, the parameter and the value
//!   (`moekit_router_config_check: config->top_k = 40 is outside [1, 32]`).
//! - Configs ([`RouterConfig`], [`PlanConfig`], [`ExpertsConfig`], [`MlpConfig`], [`LayerConfig`],
//!   [`EpConfig`]) start from the library's own defaults (its `_init` functions) and are set with
//!   builder methods; `check()` runs the library's validation without a device.
//! - Size queries (workspaces, plan rows, saved buffers) are safe: they only do host arithmetic.
//! - Entry points that run on the device take [`DevicePtr`]s (device addresses; null where the C
//!   API allows NULL) and a [`Stream`]; they are `unsafe`: the caller promises that every pointer
//!   addresses device memory of the documented shape that stays valid until the stream has run
//!   the work. The library validates everything it can (NULLs, alignment, overlaps, sizes,
//!   configs) before it enqueues anything.
//!
//! The contract of each function (formula, shapes, statuses) is in `include/moekit/*.h`;
//! [`moekit_sys`] has the raw declarations.

pub use moekit_sys as sys;

mod error;
mod types;

pub mod ep;
pub mod experts;
pub mod layer;
pub mod router;
pub mod tokens;

pub use ep::{EpConfig, EpHandle, EpMode};
pub use error::{last_error, Error, Result, Status};
pub use experts::{Activation, ExpertsConfig, GateUpLayout, MlpConfig, MlpHandle, WeightLayout};
pub use layer::{Layer, LayerConfig, LayerStage};
pub use router::{GroupMask, GroupScore, RouterConfig, ScoreFunc, SoftmaxOrder};
pub use tokens::{DropPolicy, PlanConfig, TokenPlan};
pub use types::{DevicePtr, Dtype, Stream, Workspace};

/// A version as MAJOR.MINOR.PATCH.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: i32,
    pub minor: i32,
    pub patch: i32,
}

impl Version {
    fn from_code(v: i32) -> Version {
        Version { major: v / 10000, minor: (v / 100) % 100, patch: v % 100 }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The version of the loaded library (`moekit_get_version`).
pub fn version() -> Version {
    Version::from_code(unsafe { sys::moekit_get_version() })
}

/// The version of the headers these bindings mirror (`MOEKIT_VERSION`).
pub const HEADER_VERSION: Version =
    Version { major: sys::MOEKIT_VERSION_MAJOR, minor: sys::MOEKIT_VERSION_MINOR, patch: sys::MOEKIT_VERSION_PATCH };

/// The largest K (experts per token) any call accepts.
pub const MAX_TOP_K: i32 = sys::MOEKIT_MAX_TOP_K;

/// Required alignment of every workspace, in bytes.
pub const WORKSPACE_ALIGNMENT: usize = sys::MOEKIT_WORKSPACE_ALIGNMENT as usize;
