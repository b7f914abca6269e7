//! The router (moekit/router.h): configs with the model-table presets, forward, backward with the
//! aux-loss term, the aux-loss value, the bias update and the fake balanced gate.
use std::ffi::c_void;

use crate::error::{check, query, Result};
use crate::sys;
use crate::types::{config_defaults, DevicePtr, Dtype, Stream, Workspace};

macro_rules! int_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $c:path),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(i32)]
        pub enum $name { $($(#[$vm])* $v = $c),* }
        impl $name {
            pub fn raw(self) -> i32 { self as i32 }
            pub fn from_raw(raw: i32) -> Option<Self> {
                match raw { $(x if x == $c => Some($name::$v),)* _ => None }
            }
        }
    };
}
pub(crate) use int_enum;

int_enum!(
    /// `moekit_score_func_t`.
    ScoreFunc { Softmax = sys::MOEKIT_SCORE_SOFTMAX, Sigmoid = sys::MOEKIT_SCORE_SIGMOID,
                SqrtSoftplus = sys::MOEKIT_SCORE_SQRT_SOFTPLUS });
int_enum!(
    /// `moekit_softmax_order_t`.
    SoftmaxOrder { SoftmaxThenTopk = sys::MOEKIT_SOFTMAX_THEN_TOPK, TopkThenSoftmax = sys::MOEKIT_TOPK_THEN_SOFTMAX });
int_enum!(
    /// `moekit_group_score_t`.
    GroupScore { Auto = sys::MOEKIT_GROUP_SCORE_AUTO, Max = sys::MOEKIT_GROUP_SCORE_MAX,
                 Top2Sum = sys::MOEKIT_GROUP_SCORE_TOP2_SUM, TopnSum = sys::MOEKIT_GROUP_SCORE_TOPN_SUM });
int_enum!(
    /// `moekit_group_mask_t`.
    GroupMask { Zero = sys::MOEKIT_GROUP_MASK_ZERO, NegInf = sys::MOEKIT_GROUP_MASK_NEG_INF });

/// A preset name as matched: lower case, without "-", "_" and ".".
fn preset_key(name: &str) -> String {
    name.chars().filter(|c| !"-_.".contains(*c)).collect::<String>().to_lowercase()
}

/// `moekit_router_config_t`, starting from the library's defaults.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    raw: sys::moekit_router_config_t,
}

/// Names of the model-table presets ([`RouterConfig::preset`]).
pub const PRESETS: [&str; 7] = ["deepseek_v3", "moonlight", "qwen3", "gpt_oss", "glm45", "mixtral", "nemotron"];

impl RouterConfig {
    /// The library's defaults (`moekit_router_config_init`); E and K must still be set.
    pub fn defaults() -> Self {
        RouterConfig { raw: config_defaults(sys::moekit_router_config_init, "moekit_router_config_init") }
    }
    /// E experts, K per token, the rest at the library's defaults.
    pub fn new(num_experts: i32, top_k: i32) -> Self {
        let mut c = Self::defaults();
        c.raw.num_experts = num_experts;
        c.raw.top_k = top_k;
        c
    }
    pub fn score_func(mut self, f: ScoreFunc) -> Self {
        self.raw.score_func = f.raw();
        self
    }
    pub fn softmax_order(mut self, o: SoftmaxOrder) -> Self {
        self.raw.softmax_order = o.raw();
        self
    }
    /// G expert groups of which G' are kept per token.
    pub fn groups(mut self, num_groups: i32, num_groups_kept: i32) -> Self {
        self.raw.num_groups = num_groups;
        self.raw.num_groups_kept = num_groups_kept;
        self
    }
    pub fn group_score(mut self, s: GroupScore) -> Self {
        self.raw.group_score = s.raw();
        self
    }
    pub fn group_score_topn(mut self, n: i32) -> Self {
        self.raw.group_score_topn = n;
        self
    }
    pub fn group_mask(mut self, m: GroupMask) -> Self {
        self.raw.group_mask = m.raw();
        self
    }
    pub fn normalize(mut self, on: bool) -> Self {
        self.raw.normalize = on as i32;
        self
    }
    pub fn weights_use_bias(mut self, on: bool) -> Self {
        self.raw.weights_use_bias = on as i32;
        self
    }
    pub fn accumulate_load(mut self, on: bool) -> Self {
        self.raw.accumulate_load = on as i32;
        self
    }
    pub fn route_scale(mut self, rho: f32) -> Self {
        self.raw.route_scale = rho;
        self
    }

    pub fn num_experts(&self) -> i32 {
        self.raw.num_experts
    }
    pub fn top_k(&self) -> i32 {
        self.raw.top_k
    }
    pub fn raw(&self) -> &sys::moekit_router_config_t {
        &self.raw
    }
    /// The C struct, for fields this crate has no builder for.
    pub fn raw_mut(&mut self) -> &mut sys::moekit_router_config_t {
        &mut self.raw
    }

    /// DeepSeek-V3: 256 experts, top 8, sigmoid, 8 groups keep 4 (top-2 sums with the fp32
    /// correction bias the model routes with), normalised, scale 2.5.
    pub fn deepseek_v3() -> Self {
        Self::new(256, 8).score_func(ScoreFunc::Sigmoid).groups(8, 4).normalize(true).route_scale(2.5)
    }
    /// Moonlight-16B-A3B: 64 experts, top 6, sigmoid, normalised, scale 2.446.
    pub fn moonlight() -> Self {
        Self::new(64, 6).score_func(ScoreFunc::Sigmoid).normalize(true).route_scale(2.446)
    }
    /// Qwen3-MoE: 128 experts, top 8, softmax then top-k, normalised.
    pub fn qwen3() -> Self {
        Self::new(128, 8).normalize(true)
    }
    /// GPT-OSS-120B: 128 experts (32 for the 20B), top 4, top-k logits then softmax.
    pub fn gpt_oss() -> Self {
        Self::new(128, 4).softmax_order(SoftmaxOrder::TopkThenSoftmax)
    }
    /// GLM-4.5: 160 experts, top 8, sigmoid with the correction bias, normalised, scale 2.5.
    pub fn glm45() -> Self {
        Self::new(160, 8).score_func(ScoreFunc::Sigmoid).normalize(true).route_scale(2.5)
    }
    /// Mixtral-8x7B: 8 experts, top 2, softmax, renormalised.
    pub fn mixtral() -> Self {
        Self::new(8, 2).normalize(true)
    }
    /// Nemotron-3 Nano: 128 experts, top 6, sigmoid with the correction bias, normalised, scale 2.5.
    pub fn nemotron() -> Self {
        Self::new(128, 6).score_func(ScoreFunc::Sigmoid).normalize(true).route_scale(2.5)
    }
    /// A preset by name (see [`PRESETS`]; case, "-", "_" and "." ignored: "DeepSeek-V3", "glm-4.5").
    pub fn preset(name: &str) -> Option<Self> {
        Some(match preset_key(name).as_str() {
            "deepseekv3" => Self::deepseek_v3(),
            "moonlight" => Self::moonlight(),
            "qwen3" => Self::qwen3(),
            "gptoss" => Self::gpt_oss(),
            "glm45" => Self::glm45(),
            "mixtral" => Self::mixtral(),
            "nemotron" => Self::nemotron(),
            _ => return None,
        })
    }
    /// Whether the preset's model routes with an fp32 correction bias.
    pub fn preset_uses_correction_bias(name: &str) -> Option<bool> {
        Self::preset(name).map(|_| matches!(preset_key(name).as_str(), "deepseekv3" | "glm45" | "nemotron"))
    }

    /// The library's checks (`moekit_router_config_check`); no device needed.
    pub fn check(&self) -> Result<()> {
        check(unsafe { sys::moekit_router_config_check(&self.raw) })
    }
    /// Workspace bytes of [`forward`] for `num_tokens` tokens.
    pub fn forward_workspace_size(&self, num_tokens: i64) -> Result<usize> {
        query(|n| unsafe { sys::moekit_router_forward_workspace_size(&self.raw, num_tokens, n) })
    }
    /// Workspace bytes of [`backward`] for `num_tokens` tokens.
    pub fn backward_workspace_size(&self, num_tokens: i64) -> Result<usize> {
        query(|n| unsafe { sys::moekit_router_backward_workspace_size(&self.raw, num_tokens, n) })
    }
}

/// Arguments of [`forward`] (moekit_router_forward); null pointers are the C API's NULLs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardArgs {
    pub num_tokens: i64,
    pub logits_dtype: Dtype,
    /// z [T, E] of logits_dtype, rows logits_row_stride (>= E) elements apart.
    pub logits: DevicePtr<c_void>,
    pub logits_row_stride: i64,
    /// b [E] fp32, or null.
    pub correction_bias: DevicePtr<f32>,
    /// m [T] uint8, or null (all real).
    pub token_mask: DevicePtr<u8>,
    /// [T, K] fp32 out.
    pub weights: DevicePtr<f32>,
    /// [T, K] int32 out.
    pub indices: DevicePtr<i32>,
    /// L [E] int32 in/out, or null.
    pub expert_load: DevicePtr<i32>,
    /// S [E] fp32 out, or null (given with aux_token_count).
    pub aux_score_sum: DevicePtr<f32>,
    /// N [1] int32 out, or null.
    pub aux_token_count: DevicePtr<i32>,
}

/// moekit_router_forward.
///
/// # Safety
/// Every non-null pointer addresses device memory of its documented shape (moekit/router.h),
/// valid until `stream` has run the call; the workspace is at least its size query.
pub unsafe fn forward(config: &RouterConfig, a: &ForwardArgs, workspace: Workspace, stream: Stream) -> Result<()> {
    check(sys::moekit_router_forward(
        config.raw(),
        a.num_tokens,
        a.logits_dtype.raw(),
        a.logits.as_ptr(),
        a.logits_row_stride,
        a.correction_bias.as_ptr(),
        a.token_mask.as_ptr(),
        a.weights.as_mut_ptr(),
        a.indices.as_mut_ptr(),
        a.expert_load.as_mut_ptr(),
        a.aux_score_sum.as_mut_ptr(),
        a.aux_token_count.as_mut_ptr(),
        workspace.as_mut_ptr(),
        workspace.bytes,
        stream.as_raw(),
    ))
}

/// Arguments of [`backward`] (moekit_router_backward).
#[derive(Clone, Copy, Debug, Default)]
pub struct BackwardArgs {
    pub num_tokens: i64,
    pub logits_dtype: Dtype,
    pub logits: DevicePtr<c_void>,
    pub logits_row_stride: i64,
    pub correction_bias: DevicePtr<f32>,
    pub token_mask: DevicePtr<u8>,
    /// idx [T, K] from the forward.
    pub indices: DevicePtr<i32>,
    /// dL/dw [T, K] fp32, or null (only the aux term).
    pub grad_weights: DevicePtr<f32>,
    /// alpha times the loss scale; 0 disables the aux term.
    pub aux_loss_coeff: f32,
    /// The forward's L and N (needed when aux_loss_coeff != 0).
    pub expert_load: DevicePtr<i32>,
    pub aux_token_count: DevicePtr<i32>,
    /// dL/dz [T, E] of logits_dtype out, rows grad_logits_row_stride apart.
    pub grad_logits: DevicePtr<c_void>,
    pub grad_logits_row_stride: i64,
}

/// moekit_router_backward.
///
/// # Safety
/// As [`forward`].
pub unsafe fn backward(config: &RouterConfig, a: &BackwardArgs, workspace: Workspace, stream: Stream) -> Result<()> {
    check(sys::moekit_router_backward(
        config.raw(),
        a.num_tokens,
        a.logits_dtype.raw(),
        a.logits.as_ptr(),
        a.logits_row_stride,
        a.correction_bias.as_ptr(),
        a.token_mask.as_ptr(),
        a.indices.as_ptr(),
        a.grad_weights.as_ptr(),
        a.aux_loss_coeff,
        a.expert_load.as_ptr(),
        a.aux_token_count.as_ptr(),
        a.grad_logits.as_mut_ptr(),
        a.grad_logits_row_stride,
        workspace.as_mut_ptr(),
        workspace.bytes,
        stream.as_raw(),
    ))
}

/// moekit_aux_loss_forward: aux [1] fp32 from L [E], S [E], N [1].
///
/// # Safety
/// As [`forward`].
pub unsafe fn aux_loss(
    num_experts: i32, top_k: i32, expert_load: DevicePtr<i32>, aux_score_sum: DevicePtr<f32>,
    aux_token_count: DevicePtr<i32>, aux_loss: DevicePtr<f32>, stream: Stream,
) -> Result<()> {
    check(sys::moekit_aux_loss_forward(
        num_experts,
        top_k,
        expert_load.as_ptr(),
        aux_score_sum.as_ptr(),
        aux_token_count.as_ptr(),
        aux_loss.as_mut_ptr(),
        stream.as_raw(),
    ))
}

/// moekit_router_bias_update: b += update_rate * sign(mean(L) - L), in place.
///
/// # Safety
/// As [`forward`].
pub unsafe fn bias_update(
    num_experts: i32, update_rate: f32, recenter: bool, correction_bias: DevicePtr<f32>, expert_load: DevicePtr<i32>,
    reset_load: bool, stream: Stream,
) -> Result<()> {
    check(sys::moekit_router_bias_update(
        num_experts,
        update_rate,
        recenter as i32,
        correction_bias.as_mut_ptr(),
        expert_load.as_mut_ptr(),
        reset_load as i32,
        stream.as_raw(),
    ))
}

/// Arguments of [`fake_gate`] (moekit_fake_gate_forward).
#[derive(Clone, Copy, Debug, Default)]
pub struct FakeGateArgs {
    pub num_tokens: i64,
    pub num_experts: i32,
    pub top_k: i32,
    pub skip_experts: i32,
    pub noise: f32,
    pub seed: u64,
    pub offset: u64,
    pub token_mask: DevicePtr<u8>,
    pub weights: DevicePtr<f32>,
    pub indices: DevicePtr<i32>,
    pub expert_load: DevicePtr<i32>,
    pub accumulate_load: bool,
}

/// moekit_fake_gate_forward.
///
/// # Safety
/// As [`forward`].
pub unsafe fn fake_gate(a: &FakeGateArgs, stream: Stream) -> Result<()> {
    check(sys::moekit_fake_gate_forward(
        a.num_tokens,
        a.num_experts,
        a.top_k,
        a.skip_experts,
        a.noise,
        a.seed,
        a.offset,
        a.token_mask.as_ptr(),
        a.weights.as_mut_ptr(),
        a.indices.as_mut_ptr(),
        a.expert_load.as_mut_ptr(),
        a.accumulate_load as i32,
        stream.as_raw(),
    ))
}
