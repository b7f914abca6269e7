//! Expert parallelism over NCCL (moekit/ep.h). moekit never creates a communicator: pass an
//! `ncclComm_t` (as `*mut c_void`) made by the caller.
use std::ffi::c_void;

use crate::error::{check, query, Result};
use crate::router::int_enum;
use crate::sys;
use crate::types::{config_defaults, DevicePtr, Dtype, Stream, Workspace};

int_enum!(
    /// `moekit_ep_mode_t`.
    EpMode { Exact = sys::MOEKIT_EP_MODE_EXACT, Capacity = sys::MOEKIT_EP_MODE_CAPACITY });

/// NCCL_VERSION_CODE of the NCCL moekit uses (NotAvailable when built without NCCL).
pub fn nccl_version() -> Result<i32> {
    query(|v| unsafe { sys::moekit_ep_nccl_version(v) })
}

/// `moekit_ep_config_t`, starting from the library's defaults.
#[derive(Clone, Copy, Debug)]
pub struct EpConfig {
    raw: sys::moekit_ep_config_t,
}

impl EpConfig {
    /// The library's defaults (`moekit_ep_config_init`).
    pub fn defaults() -> Self {
        EpConfig { raw: config_defaults(sys::moekit_ep_config_init, "moekit_ep_config_init") }
    }
    /// n ranks, E experts, K per token, hidden size H, at most `max_tokens` tokens per call.
    pub fn new(num_ranks: i32, num_experts: i32, top_k: i32, hidden: i64, max_tokens: i64) -> Self {
        let mut c = Self::defaults();
        c.raw.num_ranks = num_ranks;
        c.raw.num_experts = num_experts;
        c.raw.top_k = top_k;
        c.raw.hidden = hidden;
        c.raw.max_tokens = max_tokens;
        c
    }
    pub fn dtype(mut self, d: Dtype) -> Self {
        self.raw.dtype = d.raw();
        self
    }
    /// The combine partials' dtype (None: the same as dtype).
    pub fn combine_dtype(mut self, d: Option<Dtype>) -> Self {
        self.raw.combine_dtype = d.map_or(-1, Dtype::raw);
        self
    }
    /// Capacity mode with `capacity` rows per (source, destination) pair (0: max_tokens).
    pub fn capacity_mode(mut self, capacity: i64) -> Self {
        self.raw.mode = EpMode::Capacity.raw();
        self.raw.capacity = capacity;
        self
    }
    pub fn num_chunks(mut self, c: i32) -> Self {
        self.raw.num_chunks = c;
        self
    }
    pub fn raw(&self) -> &sys::moekit_ep_config_t {
        &self.raw
    }
    pub fn raw_mut(&mut self) -> &mut sys::moekit_ep_config_t {
        &mut self.raw
    }
    pub fn check(&self) -> Result<()> {
        check(unsafe { sys::moekit_ep_config_check(&self.raw) })
    }
    /// (layout buffer bytes, host layout element count).
    pub fn layout_size(&self) -> Result<(usize, usize)> {
        query(|(b, n)| unsafe { sys::moekit_ep_layout_size(&self.raw, b, n) })
    }
    pub fn max_recv_rows(&self) -> Result<i64> {
        query(|r| unsafe { sys::moekit_ep_max_recv_rows(&self.raw, r) })
    }
    /// Workspace bytes: exact for an exact-mode layout's host array, the worst case with None.
    pub fn workspace_size(&self, host_layout: Option<&[i64]>) -> Result<usize> {
        let host = host_layout.map_or(std::ptr::null(), <[i64]>::as_ptr);
        query(|n| unsafe { sys::moekit_ep_workspace_size(&self.raw, host, n) })
    }
}

/// One layout: the caller's device buffer, the host array (exact mode) and the row count.
#[derive(Clone, Debug)]
pub struct EpLayout {
    pub num_tokens: i64,
    pub buffer: DevicePtr<u8>,
    pub buffer_bytes: usize,
    /// Exact mode: the host array filled by the layout; empty in capacity mode.
    pub host_layout: Vec<i64>,
    pub num_recv_rows: i64,
}

impl EpLayout {
    fn host(&self) -> *const i64 {
        if self.host_layout.is_empty() {
            std::ptr::null()
        } else {
            self.host_layout.as_ptr()
        }
    }
}

/// `moekit_ep_handle_t` over the caller's communicator; destroyed on drop. Use from one thread at
/// a time.
#[derive(Debug)]
pub struct EpHandle {
    raw: sys::moekit_ep_handle_t,
    pub config: EpConfig,
}

unsafe impl Send for EpHandle {}

impl EpHandle {
    /// moekit_ep_create.
    ///
    /// # Safety
    /// `nccl_comm` is a valid ncclComm_t that outlives the handle; the current device is its device.
    pub unsafe fn new(config: &EpConfig, nccl_comm: *mut c_void) -> Result<Self> {
        let mut raw: sys::moekit_ep_handle_t = std::ptr::null_mut();
        check(sys::moekit_ep_create(config.raw(), nccl_comm, &mut raw))?;
        Ok(EpHandle { raw, config: *config })
    }
    pub fn raw(&self) -> sys::moekit_ep_handle_t {
        self.raw
    }

    /// moekit_ep_layout (exact mode: a collective with one host read). `buffer` holds
    /// `config.layout_size().0` bytes; `dropped` ([1] int32) may be null.
    ///
    /// # Safety
    /// Device pointers valid as documented in moekit/ep.h; every rank calls it in the same order.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn layout(
        &self, num_tokens: i64, indices: DevicePtr<i32>, token_mask: DevicePtr<u8>, buffer: DevicePtr<u8>,
        buffer_bytes: usize, dropped: DevicePtr<i32>, stream: Stream,
    ) -> Result<EpLayout> {
        let (_, count) = self.config.layout_size()?;
        let exact = self.config.raw().mode == sys::MOEKIT_EP_MODE_EXACT;
        let mut host = vec![0i64; if exact { count } else { 0 }];
        let mut rows = 0i64;
        check(sys::moekit_ep_layout(
            self.raw,
            num_tokens,
            indices.as_ptr(),
            token_mask.as_ptr(),
            buffer.cast::<c_void>().as_mut_ptr(),
            buffer_bytes,
            if exact { host.as_mut_ptr() } else { std::ptr::null_mut() },
            &mut rows,
            dropped.as_mut_ptr(),
            stream.as_raw(),
        ))?;
        Ok(EpLayout { num_tokens, buffer, buffer_bytes, host_layout: host, num_recv_rows: rows })
    }

    /// (send_rows, recv_rows) per rank of an exact-mode layout.
    pub fn layout_counts(&self, layout: &EpLayout) -> Result<(Vec<i64>, Vec<i64>)> {
        let n = self.config.raw().num_ranks as usize;
        let (mut send, mut recv) = (vec![0i64; n], vec![0i64; n]);
        check(unsafe { sys::moekit_ep_layout_counts(self.raw, layout.host(), send.as_mut_ptr(), recv.as_mut_ptr()) })?;
        Ok((send, recv))
    }

    /// Workspace bytes for this layout.
    pub fn workspace_size(&self, layout: &EpLayout) -> Result<usize> {
        query(|n| unsafe { sys::moekit_ep_workspace_size(self.config.raw(), layout.host(), n) })
    }

    /// moekit_ep_dispatch (collective).
    ///
    /// # Safety
    /// As [`EpHandle::layout`].
    pub unsafe fn dispatch(&self, layout: &EpLayout, a: &Dispatch, workspace: Workspace, stream: Stream) -> Result<()> {
        check(sys::moekit_ep_dispatch(
            self.raw,
            layout.num_tokens,
            layout.buffer.cast::<c_void>().as_ptr(),
            layout.host(),
            a.x.as_ptr(),
            a.indices.as_ptr(),
            a.weights.as_ptr(),
            a.recv_x.as_mut_ptr(),
            a.recv_indices.as_mut_ptr(),
            a.recv_weights.as_mut_ptr(),
            a.recv_src_token.as_mut_ptr(),
            a.recv_mask.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_ep_combine (collective): y [T, H] from the partial rows.
    ///
    /// # Safety
    /// As [`EpHandle::layout`].
    pub unsafe fn combine(
        &self, layout: &EpLayout, partials: DevicePtr<c_void>, y: DevicePtr<c_void>, workspace: Workspace,
        stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_ep_combine(
            self.raw,
            layout.num_tokens,
            layout.buffer.cast::<c_void>().as_ptr(),
            layout.host(),
            partials.as_ptr(),
            y.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_ep_dispatch_backward (collective).
    ///
    /// # Safety
    /// As [`EpHandle::layout`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dispatch_backward(
        &self, layout: &EpLayout, indices: DevicePtr<i32>, grad_recv_x: DevicePtr<c_void>,
        grad_recv_weights: DevicePtr<f32>, grad_x: DevicePtr<c_void>, grad_weights: DevicePtr<f32>,
        workspace: Workspace, stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_ep_dispatch_backward(
            self.raw,
            layout.num_tokens,
            layout.buffer.cast::<c_void>().as_ptr(),
            layout.host(),
            indices.as_ptr(),
            grad_recv_x.as_ptr(),
            grad_recv_weights.as_ptr(),
            grad_x.as_mut_ptr(),
            grad_weights.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_ep_combine_backward (collective).
    ///
    /// # Safety
    /// As [`EpHandle::layout`].
    pub unsafe fn combine_backward(
        &self, layout: &EpLayout, grad_y: DevicePtr<c_void>, grad_partials: DevicePtr<c_void>, workspace: Workspace,
        stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_ep_combine_backward(
            self.raw,
            layout.num_tokens,
            layout.buffer.cast::<c_void>().as_ptr(),
            layout.host(),
            grad_y.as_ptr(),
            grad_partials.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }
}

impl Drop for EpHandle {
    fn drop(&mut self) {
        unsafe {
            sys::moekit_ep_destroy(self.raw);
        }
    }
}

/// Arguments of [`EpHandle::dispatch`]; the recv_* arrays have layout.num_recv_rows rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dispatch {
    pub x: DevicePtr<c_void>,
    pub indices: DevicePtr<i32>,
    pub weights: DevicePtr<f32>,
    pub recv_x: DevicePtr<c_void>,
    pub recv_indices: DevicePtr<i32>,
    pub recv_weights: DevicePtr<f32>,
    pub recv_src_token: DevicePtr<i32>,
    pub recv_mask: DevicePtr<u8>,
}

/// moekit_ep_allreduce_expert_load (collective): load [E] summed over the communicator.
///
/// # Safety
/// `nccl_comm` is a valid communicator; `expert_load` device memory of E int32.
pub unsafe fn allreduce_expert_load(
    nccl_comm: *mut c_void, num_experts: i32, expert_load: DevicePtr<i32>, stream: Stream,
) -> Result<()> {
    check(sys::moekit_ep_allreduce_expert_load(nccl_comm, num_experts, expert_load.as_mut_ptr(), stream.as_raw()))
}

/// Workspace bytes of [`allreduce_aux_stats`].
///
/// # Safety
/// `nccl_comm` is a valid communicator (its size is read).
pub unsafe fn aux_stats_workspace_size(nccl_comm: *mut c_void, num_experts: i32) -> Result<usize> {
    query(|n| unsafe { sys::moekit_ep_aux_stats_workspace_size(nccl_comm, num_experts, n) })
}

/// moekit_ep_allreduce_aux_stats (collective): S [E] in rank order and N [1], in place.
///
/// # Safety
/// As [`allreduce_expert_load`].
pub unsafe fn allreduce_aux_stats(
    nccl_comm: *mut c_void, num_experts: i32, aux_score_sum: DevicePtr<f32>, aux_token_count: DevicePtr<i32>,
    workspace: Workspace, stream: Stream,
) -> Result<()> {
    check(sys::moekit_ep_allreduce_aux_stats(
        nccl_comm,
        num_experts,
        aux_score_sum.as_mut_ptr(),
        aux_token_count.as_mut_ptr(),
        workspace.as_mut_ptr(),
        workspace.bytes,
        stream.as_raw(),
    ))
}
