//! The grouped expert FFN and the dense MLP (moekit/experts.h).
use std::ffi::c_void;

use crate::error::{check, query, Result};
use crate::router::int_enum;
use crate::sys;
use crate::types::{config_defaults, DevicePtr, Dtype, Stream, Workspace};

int_enum!(
    /// `moekit_activation_t`.
    Activation { Swiglu = sys::MOEKIT_ACTIVATION_SWIGLU, Relu2 = sys::MOEKIT_ACTIVATION_RELU2,
                 QuickGeglu = sys::MOEKIT_ACTIVATION_QUICK_GEGLU, Geglu = sys::MOEKIT_ACTIVATION_GEGLU,
                 SwigluOai = sys::MOEKIT_ACTIVATION_SWIGLU_OAI });
int_enum!(
    /// `moekit_gate_up_layout_t`.
    GateUpLayout { Auto = sys::MOEKIT_GATE_UP_AUTO, Concatenated = sys::MOEKIT_GATE_UP_CONCATENATED,
                   Interleaved = sys::MOEKIT_GATE_UP_INTERLEAVED });
int_enum!(
    /// `moekit_weight_layout_t`.
    WeightLayout { InOut = sys::MOEKIT_WEIGHT_IN_OUT, OutIn = sys::MOEKIT_WEIGHT_OUT_IN });

fn nu(activation: i32, inter: i32) -> i64 {
    if activation == sys::MOEKIT_ACTIVATION_RELU2 {
        inter as i64
    } else {
        2 * inter as i64
    }
}

/// `moekit_experts_config_t`, starting from the library's defaults.
#[derive(Clone, Copy, Debug)]
pub struct ExpertsConfig {
    raw: sys::moekit_experts_config_t,
}

impl ExpertsConfig {
    /// The library's defaults (`moekit_experts_config_init`).
    pub fn defaults() -> Self {
        ExpertsConfig { raw: config_defaults(sys::moekit_experts_config_init, "moekit_experts_config_init") }
    }
    /// E experts of hidden size H and FFN width I; the rest at the library's defaults.
    pub fn new(num_experts: i32, hidden: i32, inter: i32) -> Self {
        let mut c = Self::defaults();
        c.raw.num_experts = num_experts;
        c.raw.hidden = hidden;
        c.raw.inter = inter;
        c
    }
    pub fn dtype(mut self, d: Dtype) -> Self {
        self.raw.dtype = d.raw();
        self
    }
    pub fn activation(mut self, a: Activation) -> Self {
        self.raw.activation = a.raw();
        self
    }
    pub fn gate_up_layout(mut self, l: GateUpLayout) -> Self {
        self.raw.gate_up_layout = l.raw();
        self
    }
    pub fn weight_after_down(mut self, on: bool) -> Self {
        self.raw.weight_after_down = on as i32;
        self
    }
    pub fn act_alpha(mut self, alpha: f32) -> Self {
        self.raw.act_alpha = alpha;
        self
    }
    pub fn act_limit(mut self, limit: f32) -> Self {
        self.raw.act_limit = limit;
        self
    }
    pub fn raw(&self) -> &sys::moekit_experts_config_t {
        &self.raw
    }
    pub fn raw_mut(&mut self) -> &mut sys::moekit_experts_config_t {
        &mut self.raw
    }
    /// Columns of W_gu: 2I for gated activations, I for relu2.
    pub fn nu(&self) -> i64 {
        nu(self.raw.activation, self.raw.inter)
    }
    pub fn check(&self) -> Result<()> {
        check(unsafe { sys::moekit_experts_config_check(&self.raw) })
    }
    pub fn forward_workspace_size(&self, max_rows: i64) -> Result<usize> {
        query(|n| unsafe { sys::moekit_experts_forward_workspace_size(&self.raw, max_rows, n) })
    }
    pub fn backward_workspace_size(&self, max_rows: i64, has_saved_u: bool) -> Result<usize> {
        query(|n| unsafe { sys::moekit_experts_backward_workspace_size(&self.raw, max_rows, has_saved_u as i32, n) })
    }

    /// moekit_experts_forward (formulas in moekit/experts.h).
    ///
    /// # Safety
    /// Every non-null pointer addresses device memory of its documented shape (moekit/experts.h),
    /// 16-byte aligned, valid until `stream` has run the call.
    pub unsafe fn forward(&self, a: &ExpertsForward, workspace: Workspace, stream: Stream) -> Result<()> {
        check(sys::moekit_experts_forward(
            &self.raw,
            a.max_rows,
            a.expert_offsets.as_ptr(),
            a.xp.as_ptr(),
            a.row_weights.as_ptr(),
            a.w_gate_up.as_ptr(),
            a.b_gate_up.as_ptr(),
            a.w_down.as_ptr(),
            a.b_down.as_ptr(),
            a.u_out.as_mut_ptr(),
            a.out.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_experts_backward; null gradient pointers are not computed.
    ///
    /// # Safety
    /// As [`ExpertsConfig::forward`].
    pub unsafe fn backward(&self, a: &ExpertsBackward, workspace: Workspace, stream: Stream) -> Result<()> {
        let f = &a.forward;
        check(sys::moekit_experts_backward(
            &self.raw,
            f.max_rows,
            f.expert_offsets.as_ptr(),
            f.xp.as_ptr(),
            f.row_weights.as_ptr(),
            f.w_gate_up.as_ptr(),
            f.b_gate_up.as_ptr(),
            f.w_down.as_ptr(),
            f.b_down.as_ptr(),
            a.u.as_ptr(),
            a.grad_out.as_ptr(),
            a.grad_xp.as_mut_ptr(),
            a.grad_w_gate_up.as_mut_ptr(),
            a.grad_b_gate_up.as_mut_ptr(),
            a.grad_w_down.as_mut_ptr(),
            a.grad_b_down.as_mut_ptr(),
            a.grad_row_weights.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }
}

/// Arguments of [`ExpertsConfig::forward`]. Inputs are also read by the backward.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExpertsForward {
    /// R: rows of xp, out and u_out.
    pub max_rows: i64,
    /// [E + 1] int32 segment offsets (the plan's).
    pub expert_offsets: DevicePtr<i32>,
    /// [R, H].
    pub xp: DevicePtr<c_void>,
    /// p [R] fp32, or null (p = 1).
    pub row_weights: DevicePtr<f32>,
    /// [E, H, NU].
    pub w_gate_up: DevicePtr<c_void>,
    /// [E, NU] or null.
    pub b_gate_up: DevicePtr<c_void>,
    /// [E, I, H].
    pub w_down: DevicePtr<c_void>,
    /// [E, H] or null.
    pub b_down: DevicePtr<c_void>,
    /// [R, NU] out (saved for the backward), or null.
    pub u_out: DevicePtr<c_void>,
    /// [R, H] out.
    pub out: DevicePtr<c_void>,
}

/// Arguments of [`ExpertsConfig::backward`]: the forward's inputs (u_out and out unused), the
/// saved u (or null to recompute), dout, and the gradients to write (null: skipped).
#[derive(Clone, Copy, Debug, Default)]
pub struct ExpertsBackward {
    pub forward: ExpertsForward,
    pub u: DevicePtr<c_void>,
    pub grad_out: DevicePtr<c_void>,
    pub grad_xp: DevicePtr<c_void>,
    pub grad_w_gate_up: DevicePtr<c_void>,
    pub grad_b_gate_up: DevicePtr<c_void>,
    pub grad_w_down: DevicePtr<c_void>,
    pub grad_b_down: DevicePtr<c_void>,
    pub grad_row_weights: DevicePtr<f32>,
}

/// `moekit_mlp_config_t`, starting from the library's defaults.
#[derive(Clone, Copy, Debug)]
pub struct MlpConfig {
    raw: sys::moekit_mlp_config_t,
}

impl MlpConfig {
    /// The library's defaults (`moekit_mlp_config_init`).
    pub fn defaults() -> Self {
        MlpConfig { raw: config_defaults(sys::moekit_mlp_config_init, "moekit_mlp_config_init") }
    }
    pub fn new(hidden: i32, inter: i32) -> Self {
        let mut c = Self::defaults();
        c.raw.hidden = hidden;
        c.raw.inter = inter;
        c
    }
    pub fn dtype(mut self, d: Dtype) -> Self {
        self.raw.dtype = d.raw();
        self
    }
    pub fn activation(mut self, a: Activation) -> Self {
        self.raw.activation = a.raw();
        self
    }
    pub fn gate_up_layout(mut self, l: GateUpLayout) -> Self {
        self.raw.gate_up_layout = l.raw();
        self
    }
    pub fn weight_layout(mut self, l: WeightLayout) -> Self {
        self.raw.weight_layout = l.raw();
        self
    }
    pub fn act_alpha(mut self, alpha: f32) -> Self {
        self.raw.act_alpha = alpha;
        self
    }
    pub fn act_limit(mut self, limit: f32) -> Self {
        self.raw.act_limit = limit;
        self
    }
    pub fn raw(&self) -> &sys::moekit_mlp_config_t {
        &self.raw
    }
    pub fn raw_mut(&mut self) -> &mut sys::moekit_mlp_config_t {
        &mut self.raw
    }
    pub fn nu(&self) -> i64 {
        nu(self.raw.activation, self.raw.inter)
    }
    pub fn check(&self) -> Result<()> {
        check(unsafe { sys::moekit_mlp_config_check(&self.raw) })
    }
    pub fn forward_workspace_size(&self, num_tokens: i64) -> Result<usize> {
        query(|n| unsafe { sys::moekit_mlp_forward_workspace_size(&self.raw, num_tokens, n) })
    }
    pub fn backward_workspace_size(&self, num_tokens: i64, has_saved_u: bool) -> Result<usize> {
        query(|n| unsafe { sys::moekit_mlp_backward_workspace_size(&self.raw, num_tokens, has_saved_u as i32, n) })
    }
}

/// `moekit_mlp_handle_t`: cuBLASLt state on the device current at creation (not graph-safe to
/// create; the calls are). Calls on one handle are serialised by the library, so it may be shared
/// between threads. Destroyed on drop.
#[derive(Debug)]
pub struct MlpHandle {
    raw: sys::moekit_mlp_handle_t,
}

unsafe impl Send for MlpHandle {}
unsafe impl Sync for MlpHandle {}

impl MlpHandle {
    pub fn new() -> Result<Self> {
        let mut raw: sys::moekit_mlp_handle_t = std::ptr::null_mut();
        check(unsafe { sys::moekit_mlp_handle_create(&mut raw) })?;
        Ok(MlpHandle { raw })
    }
    pub fn raw(&self) -> sys::moekit_mlp_handle_t {
        self.raw
    }

    /// moekit_mlp_forward.
    ///
    /// # Safety
    /// As [`ExpertsConfig::forward`], on this handle's device.
    pub unsafe fn forward(
        &self, config: &MlpConfig, a: &MlpForward, workspace: Workspace, stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_mlp_forward(
            self.raw,
            config.raw(),
            a.num_tokens,
            a.x.as_ptr(),
            a.w_gate_up.as_ptr(),
            a.b_gate_up.as_ptr(),
            a.w_down.as_ptr(),
            a.b_down.as_ptr(),
            a.u_out.as_mut_ptr(),
            a.out.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_mlp_backward; null gradient pointers are not computed.
    ///
    /// # Safety
    /// As [`MlpHandle::forward`].
    pub unsafe fn backward(
        &self, config: &MlpConfig, a: &MlpBackward, workspace: Workspace, stream: Stream,
    ) -> Result<()> {
        let f = &a.forward;
        check(sys::moekit_mlp_backward(
            self.raw,
            config.raw(),
            f.num_tokens,
            f.x.as_ptr(),
            f.w_gate_up.as_ptr(),
            f.b_gate_up.as_ptr(),
            f.w_down.as_ptr(),
            f.b_down.as_ptr(),
            a.u.as_ptr(),
            a.grad_out.as_ptr(),
            a.grad_x.as_mut_ptr(),
            a.grad_w_gate_up.as_mut_ptr(),
            a.grad_b_gate_up.as_mut_ptr(),
            a.grad_w_down.as_mut_ptr(),
            a.grad_b_down.as_mut_ptr(),
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }
}

impl Drop for MlpHandle {
    fn drop(&mut self) {
        unsafe {
            sys::moekit_mlp_handle_destroy(self.raw);
        }
    }
}

/// Arguments of [`MlpHandle::forward`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MlpForward {
    pub num_tokens: i64,
    /// [T, H].
    pub x: DevicePtr<c_void>,
    /// [H, NU] (in_out) or [NU, H] (out_in).
    pub w_gate_up: DevicePtr<c_void>,
    pub b_gate_up: DevicePtr<c_void>,
    /// [I, H] (in_out) or [H, I] (out_in).
    pub w_down: DevicePtr<c_void>,
    pub b_down: DevicePtr<c_void>,
    /// [T, NU] out, or null.
    pub u_out: DevicePtr<c_void>,
    /// [T, H] out.
    pub out: DevicePtr<c_void>,
}

/// Arguments of [`MlpHandle::backward`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MlpBackward {
    pub forward: MlpForward,
    pub u: DevicePtr<c_void>,
    pub grad_out: DevicePtr<c_void>,
    pub grad_x: DevicePtr<c_void>,
    pub grad_w_gate_up: DevicePtr<c_void>,
    pub grad_b_gate_up: DevicePtr<c_void>,
    pub grad_w_down: DevicePtr<c_void>,
    pub grad_b_down: DevicePtr<c_void>,
}
