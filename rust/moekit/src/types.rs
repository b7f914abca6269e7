//! Device pointers, streams, workspaces and dtypes.
use std::ffi::c_void;
use std::marker::PhantomData;

use crate::error::{check, Result};
use crate::sys;

/// A device address of elements of type `T` (`c_void` for tensors whose element type is a
/// [`Dtype`]). Making one is safe: it is only an address, never dereferenced on the host. The
/// entry points that take it are `unsafe` (the caller promises it addresses valid device memory).
/// The null pointer stands for an absent optional argument, as NULL does in C.
#[repr(transparent)]
pub struct DevicePtr<T> {
    ptr: *mut c_void,
    _element: PhantomData<*mut T>,
}

impl<T> Clone for DevicePtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevicePtr<T> {}
impl<T> PartialEq for DevicePtr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.ptr == other.ptr
    }
}
impl<T> Eq for DevicePtr<T> {}
impl<T> std::fmt::Debug for DevicePtr<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevicePtr({:p})", self.ptr)
    }
}
impl<T> Default for DevicePtr<T> {
    fn default() -> Self {
        Self::null()
    }
}
// A device address carries no host data: moving it between threads is harmless.
unsafe impl<T> Send for DevicePtr<T> {}
unsafe impl<T> Sync for DevicePtr<T> {}

impl<T> DevicePtr<T> {
    /// The null pointer (an absent optional argument).
    pub const fn null() -> Self {
        DevicePtr { ptr: std::ptr::null_mut(), _element: PhantomData }
    }
    /// A device address (e.g. from cudaMalloc).
    pub fn from_raw(ptr: *mut T) -> Self {
        DevicePtr { ptr: ptr.cast(), _element: PhantomData }
    }
    /// A device address given as an integer.
    pub fn from_addr(addr: usize) -> Self {
        DevicePtr { ptr: addr as *mut c_void, _element: PhantomData }
    }
    pub fn addr(self) -> usize {
        self.ptr as usize
    }
    pub fn is_null(self) -> bool {
        self.ptr.is_null()
    }
    /// The same address with another element type.
    pub fn cast<U>(self) -> DevicePtr<U> {
        DevicePtr { ptr: self.ptr, _element: PhantomData }
    }
    /// `count` elements further (address arithmetic only; wrapping, never dereferenced).
    pub fn offset(self, count: usize) -> Self {
        let bytes = count * std::mem::size_of::<T>().max(1);
        DevicePtr { ptr: (self.ptr as usize).wrapping_add(bytes) as *mut c_void, _element: PhantomData }
    }
    pub fn byte_offset(self, bytes: usize) -> Self {
        DevicePtr { ptr: (self.ptr as usize).wrapping_add(bytes) as *mut c_void, _element: PhantomData }
    }
    pub fn as_ptr(self) -> *const T {
        self.ptr as *const T
    }
    pub fn as_mut_ptr(self) -> *mut T {
        self.ptr as *mut T
    }
}

/// A `cudaStream_t` (null: the legacy default stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Stream(*mut c_void);

unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    /// The legacy default stream.
    pub const LEGACY: Stream = Stream(std::ptr::null_mut());
    pub fn from_raw(stream: *mut c_void) -> Self {
        Stream(stream)
    }
    pub fn as_raw(self) -> *mut c_void {
        self.0
    }
}

impl Default for Stream {
    fn default() -> Self {
        Stream::LEGACY
    }
}

/// A caller-owned device workspace: 256-byte aligned (cudaMalloc gives that), `bytes` long. The
/// library checks the size against its query and the alignment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workspace {
    pub ptr: DevicePtr<u8>,
    pub bytes: usize,
}

impl Workspace {
    pub fn new(ptr: DevicePtr<u8>, bytes: usize) -> Self {
        Workspace { ptr, bytes }
    }
    /// No workspace (for calls whose size query returned 0).
    pub const NONE: Workspace = Workspace { ptr: DevicePtr::null(), bytes: 0 };
    /// The `void* workspace` argument (`workspace_bytes` is `self.bytes`).
    pub(crate) fn as_mut_ptr(self) -> *mut c_void {
        self.ptr.cast::<c_void>().as_mut_ptr()
    }
}

/// Element types of activations, logits and weights (`moekit_dtype_t`). The default is the
/// library's config default, BF16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Dtype {
    F32 = sys::MOEKIT_DTYPE_F32,
    F16 = sys::MOEKIT_DTYPE_F16,
    #[default]
    Bf16 = sys::MOEKIT_DTYPE_BF16,
}

impl Dtype {
    pub fn raw(self) -> sys::moekit_dtype_t {
        self as sys::moekit_dtype_t
    }
    pub fn from_raw(raw: sys::moekit_dtype_t) -> Option<Dtype> {
        match raw {
            sys::MOEKIT_DTYPE_F32 => Some(Dtype::F32),
            sys::MOEKIT_DTYPE_F16 => Some(Dtype::F16),
            sys::MOEKIT_DTYPE_BF16 => Some(Dtype::Bf16),
            _ => None,
        }
    }
    /// Bytes per element (`moekit_dtype_size`).
    pub fn size(self) -> usize {
        unsafe { sys::moekit_dtype_size(self.raw()) }
    }
}

/// A C struct filled by its `moekit_*_init(ptr, sizeof)` function (struct_size and the library's
/// defaults). `init` must be one of those functions for `T`; on failure nothing is read.
pub(crate) fn init_struct<T>(init: unsafe extern "C" fn(*mut T, usize) -> sys::moekit_status_t) -> Result<T> {
    let mut raw = std::mem::MaybeUninit::<T>::zeroed();
    check(unsafe { init(raw.as_mut_ptr(), std::mem::size_of::<T>()) })?;
    Ok(unsafe { raw.assume_init() })
}

/// A config's library defaults (`init_struct`); the `_init` function only fails when this crate's
/// struct size disagrees with the library, which is a build error, so it panics naming `init_name`.
pub(crate) fn config_defaults<T>(
    init: unsafe extern "C" fn(*mut T, usize) -> sys::moekit_status_t, init_name: &str,
) -> T {
    init_struct(init).unwrap_or_else(|e| panic!("{init_name} with this crate's struct size: {e:?}"))
}
