//! Statuses and the error type.
use std::ffi::CStr;
use std::fmt;

use crate::sys;

/// A failing `moekit_status_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    InvalidArgument,
    Unsupported,
    WorkspaceTooSmall,
    Misaligned,
    CudaError,
    CublasError,
    NcclError,
    NotAvailable,
    OutOfMemory,
    InternalError,
    /// A value this crate does not know (a newer library).
    Unknown(i32),
}

impl Status {
    /// The status of a nonzero `moekit_status_t`.
    pub fn from_raw(raw: sys::moekit_status_t) -> Status {
        match raw {
            sys::MOEKIT_STATUS_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::MOEKIT_STATUS_UNSUPPORTED => Status::Unsupported,
            sys::MOEKIT_STATUS_WORKSPACE_TOO_SMALL => Status::WorkspaceTooSmall,
            sys::MOEKIT_STATUS_MISALIGNED => Status::Misaligned,
            sys::MOEKIT_STATUS_CUDA_ERROR => Status::CudaError,
            sys::MOEKIT_STATUS_CUBLAS_ERROR => Status::CublasError,
            sys::MOEKIT_STATUS_NCCL_ERROR => Status::NcclError,
            sys::MOEKIT_STATUS_NOT_AVAILABLE => Status::NotAvailable,
            sys::MOEKIT_STATUS_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::MOEKIT_STATUS_INTERNAL_ERROR => Status::InternalError,
            other => Status::Unknown(other),
        }
    }

    /// The `moekit_status_t` value.
    pub fn raw(self) -> sys::moekit_status_t {
        match self {
            Status::InvalidArgument => sys::MOEKIT_STATUS_INVALID_ARGUMENT,
            Status::Unsupported => sys::MOEKIT_STATUS_UNSUPPORTED,
            Status::WorkspaceTooSmall => sys::MOEKIT_STATUS_WORKSPACE_TOO_SMALL,
            Status::Misaligned => sys::MOEKIT_STATUS_MISALIGNED,
            Status::CudaError => sys::MOEKIT_STATUS_CUDA_ERROR,
            Status::CublasError => sys::MOEKIT_STATUS_CUBLAS_ERROR,
            Status::NcclError => sys::MOEKIT_STATUS_NCCL_ERROR,
            Status::NotAvailable => sys::MOEKIT_STATUS_NOT_AVAILABLE,
            Status::OutOfMemory => sys::MOEKIT_STATUS_OUT_OF_MEMORY,
            Status::InternalError => sys::MOEKIT_STATUS_INTERNAL_ERROR,
            Status::Unknown(v) => v,
        }
    }

    /// `moekit_status_string`: a short constant description ("invalid argument").
    pub fn description(self) -> &'static str {
        // The library returns pointers to static strings.
        unsafe { CStr::from_ptr(sys::moekit_status_string(self.raw())) }.to_str().unwrap_or("?")
    }
}

/// A failed call: the status and the library's message (the thread's last error, copied out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.message, self.status.description())
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The calling thread's last-error message (`moekit_copy_last_error`).
pub fn last_error() -> String {
    unsafe {
        let n = sys::moekit_copy_last_error(std::ptr::null_mut(), 0);
        let mut buf = vec![0u8; n + 1];
        sys::moekit_copy_last_error(buf.as_mut_ptr().cast(), buf.len());
        buf.truncate(n);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Ok for MOEKIT_STATUS_SUCCESS, else the Error with the library's message.
pub fn check(raw: sys::moekit_status_t) -> Result<()> {
    if raw == sys::MOEKIT_STATUS_SUCCESS {
        return Ok(());
    }
    let status = Status::from_raw(raw);
    let mut message = last_error();
    if message.is_empty() {
        message = status.description().to_string();
    }
    Err(Error { status, message })
}

/// The output of a call that writes one value through its last pointer (size queries, row counts,
/// versions): `call` gets the place to write; Ok(value) on SUCCESS, else the Error. A tuple `T`
/// serves calls with two outputs.
pub(crate) fn query<T: Default>(call: impl FnOnce(&mut T) -> sys::moekit_status_t) -> Result<T> {
    let mut out = T::default();
    check(call(&mut out))?;
    Ok(out)
}
