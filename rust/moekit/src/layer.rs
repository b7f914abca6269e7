//! The whole MoE layer (moekit/layer.h): one forward and one backward call.
use std::ffi::c_void;

use crate::error::{check, query, Result};
use crate::experts::{ExpertsConfig, MlpConfig};
use crate::router::{int_enum, RouterConfig};
use crate::sys;
use crate::tokens::DropPolicy;
use crate::types::{config_defaults, init_struct, DevicePtr, Dtype, Stream, Workspace};

int_enum!(
/// `moekit_layer_stage_t`: index s of [`Layer::set_stage_events`]'s pairs.
LayerStage {
    Projection = sys::MOEKIT_LAYER_STAGE_PROJECTION, Router = sys::MOEKIT_LAYER_STAGE_ROUTER,
    Plan = sys::MOEKIT_LAYER_STAGE_PLAN, Permute = sys::MOEKIT_LAYER_STAGE_PERMUTE,
    Experts = sys::MOEKIT_LAYER_STAGE_EXPERTS, Combine = sys::MOEKIT_LAYER_STAGE_COMBINE,
    Shared = sys::MOEKIT_LAYER_STAGE_SHARED, SharedBackward = sys::MOEKIT_LAYER_STAGE_SHARED_BACKWARD,
    PermuteRecompute = sys::MOEKIT_LAYER_STAGE_PERMUTE_RECOMPUTE,
    CombineBackward = sys::MOEKIT_LAYER_STAGE_COMBINE_BACKWARD,
    ExpertsBackward = sys::MOEKIT_LAYER_STAGE_EXPERTS_BACKWARD,
    PermuteBackward = sys::MOEKIT_LAYER_STAGE_PERMUTE_BACKWARD,
    RouterBackward = sys::MOEKIT_LAYER_STAGE_ROUTER_BACKWARD,
    ProjectionBackward = sys::MOEKIT_LAYER_STAGE_PROJECTION_BACKWARD,
});

/// Number of stages; [`Layer::set_stage_events`] takes twice as many events.
pub const NUM_STAGES: usize = sys::MOEKIT_LAYER_NUM_STAGES as usize;

/// `moekit_layer_config_t` with the family configs it points to (owned here; the C struct handed
/// to the library points into this value).
#[derive(Clone, Copy, Debug)]
pub struct LayerConfig {
    pub router: RouterConfig,
    pub experts: ExpertsConfig,
    pub shared: Option<MlpConfig>,
    raw: sys::moekit_layer_config_t,
}

impl LayerConfig {
    /// The library's defaults (`moekit_layer_config_init`) with these family configs; hidden and
    /// dtype are taken from the experts config.
    pub fn new(router: RouterConfig, experts: ExpertsConfig) -> Self {
        let mut raw = config_defaults(sys::moekit_layer_config_init, "moekit_layer_config_init");
        raw.hidden = experts.raw().hidden;
        raw.dtype = experts.raw().dtype;
        LayerConfig { router, experts, shared: None, raw }
    }
    /// A layer of `router.num_experts()` experts of width `inter` over hidden size `hidden`.
    pub fn from_sizes(router: RouterConfig, hidden: i32, inter: i32, dtype: Dtype) -> Self {
        Self::new(router, ExpertsConfig::new(router.num_experts(), hidden, inter).dtype(dtype))
    }
    /// A shared MLP of width `inter` with the experts' activation (NeMo fuses n shared experts
    /// into one of width n * I).
    pub fn shared_inter(self, inter: i32) -> Self {
        let e = self.experts.raw();
        let mut m = MlpConfig::new(e.hidden, inter);
        *m.raw_mut() = sys::moekit_mlp_config_t {
            activation: e.activation,
            gate_up_layout: e.gate_up_layout,
            act_alpha: e.act_alpha,
            act_limit: e.act_limit,
            dtype: e.dtype,
            ..*m.raw()
        };
        self.shared(Some(m))
    }
    pub fn shared(mut self, shared: Option<MlpConfig>) -> Self {
        self.shared = shared;
        self
    }
    pub fn shared_gate(mut self, on: bool) -> Self {
        self.raw.shared_gate = on as i32;
        self
    }
    pub fn router_bias(mut self, on: bool) -> Self {
        self.raw.router_bias = on as i32;
        self
    }
    pub fn expert_bias(mut self, on: bool) -> Self {
        self.raw.expert_bias = on as i32;
        self
    }
    pub fn shared_bias(mut self, on: bool) -> Self {
        self.raw.shared_bias = on as i32;
        self
    }
    pub fn router_fp32(mut self, on: bool) -> Self {
        self.raw.router_fp32 = on as i32;
        self
    }
    pub fn alignment(mut self, a: i32) -> Self {
        self.raw.alignment = a;
        self
    }
    pub fn capacity(mut self, c: i32, policy: DropPolicy) -> Self {
        self.raw.capacity = c;
        self.raw.drop_policy = policy.raw();
        self
    }
    pub fn recompute(mut self, on: bool) -> Self {
        self.raw.recompute = on as i32;
        self
    }
    /// The scalar fields (the pointer fields are set by [`LayerConfig::c_config`]).
    pub fn raw_mut(&mut self) -> &mut sys::moekit_layer_config_t {
        &mut self.raw
    }

    /// The C struct, pointing at this value's family configs: valid while `self` is borrowed.
    pub fn c_config(&self) -> sys::moekit_layer_config_t {
        sys::moekit_layer_config_t {
            router: self.router.raw(),
            experts: self.experts.raw(),
            shared: self.shared.as_ref().map_or(std::ptr::null(), |s| s.raw() as *const _),
            ..self.raw
        }
    }
    /// moekit_layer_config_check (the layer config and the three it points to).
    pub fn check(&self) -> Result<()> {
        let c = self.c_config();
        check(unsafe { sys::moekit_layer_config_check(&c) })
    }
    /// Bytes of the saved buffer for `num_tokens` tokens.
    pub fn saved_size(&self, num_tokens: i64) -> Result<usize> {
        let c = self.c_config();
        query(|n| unsafe { sys::moekit_layer_saved_size(&c, num_tokens, n) })
    }
    /// (forward, backward) workspace bytes for `num_tokens` tokens.
    pub fn workspace_size(&self, num_tokens: i64) -> Result<(usize, usize)> {
        let c = self.c_config();
        query(|(f, b)| unsafe { sys::moekit_layer_workspace_size(&c, num_tokens, f, b) })
    }
    /// Where a forward puts each piece of a saved buffer (host arithmetic only).
    pub fn saved_view(
        &self, num_tokens: i64, saved: DevicePtr<u8>, saved_bytes: usize,
    ) -> Result<sys::moekit_layer_saved_view_t> {
        let c = self.c_config();
        let mut view = std::mem::MaybeUninit::<sys::moekit_layer_saved_view_t>::zeroed();
        unsafe {
            (*view.as_mut_ptr()).struct_size = std::mem::size_of::<sys::moekit_layer_saved_view_t>();
            check(sys::moekit_layer_saved_view(
                &c,
                num_tokens,
                saved.cast::<c_void>().as_mut_ptr(),
                saved_bytes,
                view.as_mut_ptr(),
            ))?;
            Ok(view.assume_init())
        }
    }
}

/// The parameters (device pointers; null where the config has none), `moekit_layer_params_t`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerParams {
    pub router_weight: DevicePtr<c_void>,
    pub router_bias: DevicePtr<c_void>,
    pub correction_bias: DevicePtr<f32>,
    pub w_gate_up: DevicePtr<c_void>,
    pub b_gate_up: DevicePtr<c_void>,
    pub w_down: DevicePtr<c_void>,
    pub b_down: DevicePtr<c_void>,
    pub shared_w_gate_up: DevicePtr<c_void>,
    pub shared_b_gate_up: DevicePtr<c_void>,
    pub shared_w_down: DevicePtr<c_void>,
    pub shared_b_down: DevicePtr<c_void>,
    pub shared_gate_weight: DevicePtr<c_void>,
}

impl LayerParams {
    fn raw(&self) -> Result<sys::moekit_layer_params_t> {
        let p = init_struct(sys::moekit_layer_params_init)?;
        Ok(sys::moekit_layer_params_t {
            router_weight: self.router_weight.as_ptr(),
            router_bias: self.router_bias.as_ptr(),
            correction_bias: self.correction_bias.as_ptr(),
            w_gate_up: self.w_gate_up.as_ptr(),
            b_gate_up: self.b_gate_up.as_ptr(),
            w_down: self.w_down.as_ptr(),
            b_down: self.b_down.as_ptr(),
            shared_w_gate_up: self.shared_w_gate_up.as_ptr(),
            shared_b_gate_up: self.shared_b_gate_up.as_ptr(),
            shared_w_down: self.shared_w_down.as_ptr(),
            shared_b_down: self.shared_b_down.as_ptr(),
            shared_gate_weight: self.shared_gate_weight.as_ptr(),
            ..p
        })
    }
}

/// Parameter gradients to write (null: skipped), `moekit_layer_grads_t`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerGrads {
    pub router_weight: DevicePtr<c_void>,
    pub router_bias: DevicePtr<c_void>,
    pub w_gate_up: DevicePtr<c_void>,
    pub b_gate_up: DevicePtr<c_void>,
    pub w_down: DevicePtr<c_void>,
    pub b_down: DevicePtr<c_void>,
    pub shared_w_gate_up: DevicePtr<c_void>,
    pub shared_b_gate_up: DevicePtr<c_void>,
    pub shared_w_down: DevicePtr<c_void>,
    pub shared_b_down: DevicePtr<c_void>,
    pub shared_gate_weight: DevicePtr<c_void>,
}

impl LayerGrads {
    fn raw(&self) -> Result<sys::moekit_layer_grads_t> {
        let g = init_struct(sys::moekit_layer_grads_init)?;
        Ok(sys::moekit_layer_grads_t {
            router_weight: self.router_weight.as_mut_ptr(),
            router_bias: self.router_bias.as_mut_ptr(),
            w_gate_up: self.w_gate_up.as_mut_ptr(),
            b_gate_up: self.b_gate_up.as_mut_ptr(),
            w_down: self.w_down.as_mut_ptr(),
            b_down: self.b_down.as_mut_ptr(),
            shared_w_gate_up: self.shared_w_gate_up.as_mut_ptr(),
            shared_b_gate_up: self.shared_b_gate_up.as_mut_ptr(),
            shared_w_down: self.shared_w_down.as_mut_ptr(),
            shared_b_down: self.shared_b_down.as_mut_ptr(),
            shared_gate_weight: self.shared_gate_weight.as_mut_ptr(),
            ..g
        })
    }
}

/// Arguments of [`Layer::forward`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerForward {
    pub num_tokens: i64,
    /// [T, H].
    pub x: DevicePtr<c_void>,
    /// [T] uint8, or null.
    pub token_mask: DevicePtr<u8>,
    pub params: LayerParams,
    /// [T, H] out.
    pub y: DevicePtr<c_void>,
    /// [E] int32 out (or accumulated into), or null.
    pub expert_load: DevicePtr<i32>,
    /// [1] fp32 out, or null.
    pub aux_loss: DevicePtr<f32>,
    /// The saved buffer (LayerConfig::saved_size bytes), kept for the backward.
    pub saved: DevicePtr<u8>,
    pub saved_bytes: usize,
}

/// Arguments of [`Layer::backward`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerBackward {
    pub num_tokens: i64,
    pub x: DevicePtr<c_void>,
    pub token_mask: DevicePtr<u8>,
    pub params: LayerParams,
    pub saved: DevicePtr<u8>,
    pub saved_bytes: usize,
    /// dy [T, H].
    pub grad_y: DevicePtr<c_void>,
    pub aux_loss_coeff: f32,
    /// dx [T, H] out.
    pub grad_x: DevicePtr<c_void>,
    pub grads: LayerGrads,
}

/// `moekit_layer_t` on the device current at creation; destroyed on drop. Use from one thread at
/// a time.
#[derive(Debug)]
pub struct Layer {
    raw: sys::moekit_layer_t,
    pub config: LayerConfig,
    events: Option<Vec<*mut c_void>>,
}

unsafe impl Send for Layer {}

impl Layer {
    /// moekit_layer_create (not graph-safe).
    pub fn new(config: &LayerConfig) -> Result<Self> {
        let c = config.c_config();
        let mut raw: sys::moekit_layer_t = std::ptr::null_mut();
        check(unsafe { sys::moekit_layer_create(&c, &mut raw) })?;
        Ok(Layer { raw, config: *config, events: None })
    }
    pub fn raw(&self) -> sys::moekit_layer_t {
        self.raw
    }

    /// moekit_layer_forward.
    ///
    /// # Safety
    /// Every non-null pointer addresses device memory of its documented shape (moekit/layer.h),
    /// 16-byte aligned (saved and workspace 256), valid until `stream` has run the call; the
    /// current device is the layer's.
    pub unsafe fn forward(&self, a: &LayerForward, workspace: Workspace, stream: Stream) -> Result<()> {
        let p = a.params.raw()?;
        check(sys::moekit_layer_forward(
            self.raw,
            a.num_tokens,
            a.x.as_ptr(),
            a.token_mask.as_ptr(),
            &p,
            a.y.as_mut_ptr(),
            a.expert_load.as_mut_ptr(),
            a.aux_loss.as_mut_ptr(),
            a.saved.cast::<c_void>().as_mut_ptr(),
            a.saved_bytes,
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_layer_backward.
    ///
    /// # Safety
    /// As [`Layer::forward`].
    pub unsafe fn backward(&self, a: &LayerBackward, workspace: Workspace, stream: Stream) -> Result<()> {
        let p = a.params.raw()?;
        let g = a.grads.raw()?;
        check(sys::moekit_layer_backward(
            self.raw,
            a.num_tokens,
            a.x.as_ptr(),
            a.token_mask.as_ptr(),
            &p,
            a.saved.cast::<c_void>().as_ptr(),
            a.saved_bytes,
            a.grad_y.as_ptr(),
            a.aux_loss_coeff,
            a.grad_x.as_mut_ptr(),
            &g,
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_layer_set_stage_events: 2 * NUM_STAGES cudaEvent_t (kept here while set), or None.
    ///
    /// # Safety
    /// Every event is a valid cudaEvent_t of the layer's device that outlives its use.
    pub unsafe fn set_stage_events(&mut self, events: Option<Vec<*mut c_void>>) -> Result<()> {
        match events {
            None => {
                check(sys::moekit_layer_set_stage_events(self.raw, std::ptr::null(), 0))?;
                self.events = None;
            }
            Some(v) => {
                check(sys::moekit_layer_set_stage_events(self.raw, v.as_ptr(), v.len() as i32))?;
                self.events = Some(v);
            }
        }
        Ok(())
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        unsafe {
            sys::moekit_layer_destroy(self.raw);
        }
    }
}
