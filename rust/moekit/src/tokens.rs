//! Token movement (moekit/tokens.h): the routing plan, permute, combine and both backwards.
use std::ffi::c_void;

use crate::error::{check, query, Result};
use crate::router::int_enum;
use crate::sys;
use crate::types::{config_defaults, init_struct, DevicePtr, Dtype, Stream, Workspace};

int_enum!(
    /// `moekit_drop_policy_t`.
    DropPolicy { ByPosition = sys::MOEKIT_DROP_BY_POSITION, ByWeight = sys::MOEKIT_DROP_BY_WEIGHT });

/// `moekit_plan_config_t`, starting from the library's defaults.
#[derive(Clone, Copy, Debug)]
pub struct PlanConfig {
    raw: sys::moekit_plan_config_t,
}

impl PlanConfig {
    /// The library's defaults (`moekit_plan_config_init`); E and K must still be set.
    pub fn defaults() -> Self {
        PlanConfig { raw: config_defaults(sys::moekit_plan_config_init, "moekit_plan_config_init") }
    }
    pub fn new(num_experts: i32, top_k: i32) -> Self {
        let mut c = Self::defaults();
        c.raw.num_experts = num_experts;
        c.raw.top_k = top_k;
        c
    }
    /// This rank's experts [begin, begin + count) (count 0: all from begin).
    pub fn local_experts(mut self, begin: i32, count: i32) -> Self {
        self.raw.local_expert_begin = begin;
        self.raw.num_local_experts = count;
        self
    }
    pub fn alignment(mut self, a: i32) -> Self {
        self.raw.alignment = a;
        self
    }
    /// At most `c` rows per expert (0: dropless), dropping by `policy`.
    pub fn capacity(mut self, c: i32, policy: DropPolicy) -> Self {
        self.raw.capacity = c;
        self.raw.drop_policy = policy.raw();
        self
    }
    pub fn raw(&self) -> &sys::moekit_plan_config_t {
        &self.raw
    }
    pub fn raw_mut(&mut self) -> &mut sys::moekit_plan_config_t {
        &mut self.raw
    }
    pub fn top_k(&self) -> i32 {
        self.raw.top_k
    }
    /// E_local.
    pub fn local_expert_count(&self) -> i32 {
        if self.raw.num_local_experts != 0 {
            self.raw.num_local_experts
        } else {
            self.raw.num_experts - self.raw.local_expert_begin
        }
    }
    pub fn check(&self) -> Result<()> {
        check(unsafe { sys::moekit_plan_config_check(&self.raw) })
    }
    /// moekit_plan_max_rows: the worst-case number of rows for `num_tokens` tokens.
    pub fn max_rows(&self, num_tokens: i64) -> Result<i64> {
        query(|n| unsafe { sys::moekit_plan_max_rows(&self.raw, num_tokens, n) })
    }
    pub fn workspace_size(&self, num_tokens: i64) -> Result<usize> {
        query(|n| unsafe { sys::moekit_plan_workspace_size(&self.raw, num_tokens, n) })
    }
    /// Bytes of one device buffer holding the five plan arrays.
    pub fn buffer_size(&self, num_tokens: i64) -> Result<usize> {
        query(|n| unsafe { sys::moekit_plan_buffer_size(&self.raw, num_tokens, n) })
    }
}

/// A plan's five device arrays for a fixed (config, num_tokens), carved from one buffer.
#[derive(Clone, Copy, Debug)]
pub struct TokenPlan {
    pub config: PlanConfig,
    pub num_tokens: i64,
    pub max_rows: i64,
    raw: sys::moekit_token_plan_t,
}

impl TokenPlan {
    /// moekit_plan_bind: points the arrays into `buffer` (host arithmetic only). The buffer must
    /// hold `config.buffer_size(num_tokens)` bytes and stay alive while the plan is used.
    pub fn bind(config: &PlanConfig, num_tokens: i64, buffer: DevicePtr<u8>, buffer_bytes: usize) -> Result<Self> {
        let mut raw = init_struct(sys::moekit_token_plan_init)?;
        check(unsafe {
            sys::moekit_plan_bind(
                config.raw(),
                num_tokens,
                buffer.cast::<c_void>().as_mut_ptr(),
                buffer_bytes,
                &mut raw,
            )
        })?;
        Ok(TokenPlan { config: *config, num_tokens, max_rows: config.max_rows(num_tokens)?, raw })
    }
    pub fn raw(&self) -> &sys::moekit_token_plan_t {
        &self.raw
    }
    /// [E_local] kept rows per expert.
    pub fn expert_counts(&self) -> DevicePtr<i32> {
        DevicePtr::from_raw(self.raw.expert_counts)
    }
    /// [E_local + 1] segment offsets; the last is the routed total.
    pub fn expert_offsets(&self) -> DevicePtr<i32> {
        DevicePtr::from_raw(self.raw.expert_offsets)
    }
    /// [T K] row of each slot, or -1.
    pub fn row_of_slot(&self) -> DevicePtr<i32> {
        DevicePtr::from_raw(self.raw.row_of_slot)
    }
    /// [max_rows] slot of each row, or -1 for padding.
    pub fn slot_of_row(&self) -> DevicePtr<i32> {
        DevicePtr::from_raw(self.raw.slot_of_row)
    }
    /// [3]: rows, dropped, invalid.
    pub fn totals(&self) -> DevicePtr<i32> {
        DevicePtr::from_raw(self.raw.totals)
    }

    /// moekit_plan_build from indices [T, K] (weights [T, K] only for a capacity by weight).
    ///
    /// # Safety
    /// Every non-null pointer and the plan's buffer address valid device memory of the documented
    /// shape (moekit/tokens.h) until `stream` has run the call.
    pub unsafe fn build(
        &self, indices: DevicePtr<i32>, weights: DevicePtr<f32>, token_mask: DevicePtr<u8>, workspace: Workspace,
        stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_plan_build(
            self.config.raw(),
            self.num_tokens,
            indices.as_ptr(),
            weights.as_ptr(),
            token_mask.as_ptr(),
            &self.raw,
            workspace.as_mut_ptr(),
            workspace.bytes,
            stream.as_raw(),
        ))
    }

    /// moekit_tokens_permute: xp [max_rows, H] (and row_weights [max_rows] when weights is given).
    ///
    /// # Safety
    /// As [`TokenPlan::build`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn permute(
        &self, hidden: i64, dtype: Dtype, x: DevicePtr<c_void>, x_row_stride: i64, weights: DevicePtr<f32>,
        xp: DevicePtr<c_void>, row_weights: DevicePtr<f32>, stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_tokens_permute(
            self.config.raw(),
            &self.raw,
            self.num_tokens,
            hidden,
            dtype.raw(),
            x.as_ptr(),
            x_row_stride,
            weights.as_ptr(),
            xp.as_mut_ptr(),
            row_weights.as_mut_ptr(),
            stream.as_raw(),
        ))
    }

    /// moekit_tokens_combine: y [T, H] = sum_k w yp[row(t, k)] (unweighted when weights is null).
    ///
    /// # Safety
    /// As [`TokenPlan::build`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn combine(
        &self, hidden: i64, dtype: Dtype, yp: DevicePtr<c_void>, weights: DevicePtr<f32>, y: DevicePtr<c_void>,
        y_row_stride: i64, stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_tokens_combine(
            self.config.raw(),
            &self.raw,
            self.num_tokens,
            hidden,
            dtype.raw(),
            yp.as_ptr(),
            weights.as_ptr(),
            y.as_mut_ptr(),
            y_row_stride,
            stream.as_raw(),
        ))
    }

    /// moekit_tokens_permute_backward.
    ///
    /// # Safety
    /// As [`TokenPlan::build`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn permute_backward(
        &self, hidden: i64, dtype: Dtype, grad_xp: DevicePtr<c_void>, grad_row_weights: DevicePtr<f32>,
        grad_x: DevicePtr<c_void>, grad_x_row_stride: i64, grad_weights: DevicePtr<f32>, stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_tokens_permute_backward(
            self.config.raw(),
            &self.raw,
            self.num_tokens,
            hidden,
            dtype.raw(),
            grad_xp.as_ptr(),
            grad_row_weights.as_ptr(),
            grad_x.as_mut_ptr(),
            grad_x_row_stride,
            grad_weights.as_mut_ptr(),
            stream.as_raw(),
        ))
    }

    /// moekit_tokens_combine_backward.
    ///
    /// # Safety
    /// As [`TokenPlan::build`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn combine_backward(
        &self, hidden: i64, dtype: Dtype, grad_y: DevicePtr<c_void>, grad_y_row_stride: i64, weights: DevicePtr<f32>,
        yp: DevicePtr<c_void>, grad_yp: DevicePtr<c_void>, grad_weights: DevicePtr<f32>, stream: Stream,
    ) -> Result<()> {
        check(sys::moekit_tokens_combine_backward(
            self.config.raw(),
            &self.raw,
            self.num_tokens,
            hidden,
            dtype.raw(),
            grad_y.as_ptr(),
            grad_y_row_stride,
            weights.as_ptr(),
            yp.as_ptr(),
            grad_yp.as_mut_ptr(),
            grad_weights.as_mut_ptr(),
            stream.as_raw(),
        ))
    }
}
