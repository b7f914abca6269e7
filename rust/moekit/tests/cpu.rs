//! Host-side tests through the real library: no GPU needed. The library validates every argument
//! before it touches the device, so the error paths of the entry points run here with device
//! pointers that are fake addresses (never dereferenced).
use std::ffi::c_void;

use moekit::router::{self, ForwardArgs};
use moekit::{
    Activation, DevicePtr, DropPolicy, Dtype, EpConfig, ExpertsConfig, LayerConfig, MlpConfig, PlanConfig,
    RouterConfig, ScoreFunc, Status, Stream, TokenPlan, Workspace,
};

/// A fake device address, 256-byte aligned, far from anything real.
fn fake<T>(slot: usize) -> DevicePtr<T> {
    DevicePtr::from_addr(0x7f10_0000_0000 + slot * (1 << 24))
}

#[test]
fn version_matches_the_headers() {
    assert_eq!(moekit::version(), moekit::HEADER_VERSION);
    assert_eq!(moekit::version().to_string(), "0.1.0");
    assert_eq!(Dtype::Bf16.size(), 2);
    assert_eq!(Dtype::F32.size(), 4);
    assert_eq!(Dtype::from_raw(1), Some(Dtype::F16));
    assert_eq!(Dtype::from_raw(7), None);
}

#[test]
fn statuses_round_trip_and_describe_themselves() {
    for raw in 1..=10 {
        let s = Status::from_raw(raw);
        assert_ne!(s, Status::Unknown(raw), "status {raw} has a variant");
        assert_eq!(s.raw(), raw);
        assert!(!s.description().is_empty() && s.description() != "unknown moekit status");
    }
    assert_eq!(Status::from_raw(99), Status::Unknown(99));
    assert_eq!(Status::Unknown(99).description(), "unknown moekit status");
}

#[test]
fn errors_carry_the_librarys_message() {
    let err = RouterConfig::new(32, 40).check().unwrap_err();
    assert_eq!(err.status, Status::InvalidArgument);
    assert_eq!(err.message, "moekit_router_config_check: config->top_k = 40 is outside [1, 32]");
    assert_eq!(err.to_string(), "moekit_router_config_check: config->top_k = 40 is outside [1, 32] [invalid argument]");
    RouterConfig::new(32, 4).check().unwrap();
    assert_eq!(moekit::last_error(), "", "a successful call clears the message");
}

#[test]
fn last_error_is_per_thread() {
    let err = PlanConfig::new(8, 2).alignment(0).check().unwrap_err();
    assert!(err.message.contains("config->alignment = 0"));
    let other = std::thread::spawn(moekit::last_error).join().unwrap();
    assert_eq!(other, "");
    assert!(moekit::last_error().contains("alignment = 0"));
}

#[test]
fn bad_configs_name_the_field() {
    let cases: Vec<(moekit::Result<()>, &str)> = vec![
        (RouterConfig::new(64, 4).groups(3, 1).check(), "config->num_groups = 3 does not divide num_experts = 64"),
        (ExpertsConfig::new(8, 12, 16).check(), "config->hidden = 12 is not a multiple of 8"),
        (MlpConfig::new(16, 12).check(), "config->inter = 12"),
        (EpConfig::new(0, 8, 2, 64, 16).check(), "config->num_ranks = 0"),
        (PlanConfig::new(8, 9).check(), "config->top_k = 9"),
    ];
    for (result, text) in cases {
        let err = result.unwrap_err();
        assert_eq!(err.status, Status::InvalidArgument);
        assert!(err.message.contains(text), "{:?} should contain {text:?}", err.message);
    }
}

#[test]
fn builders_start_from_the_library_defaults() {
    let r = RouterConfig::defaults();
    let raw = r.raw();
    assert_eq!(raw.struct_size, std::mem::size_of::<moekit::sys::moekit_router_config_t>());
    assert_eq!((raw.num_groups, raw.num_groups_kept, raw.group_score_topn, raw.route_scale), (1, 1, 2, 1.0));
    let e = ExpertsConfig::new(8, 64, 32);
    assert_eq!(e.raw().dtype, Dtype::Bf16.raw());
    assert_eq!(e.raw().act_alpha, 1.702f32);
    assert_eq!(e.nu(), 64);
    assert_eq!(e.activation(Activation::Relu2).nu(), 32);
    assert_eq!(EpConfig::defaults().raw().combine_dtype, -1);
    assert_eq!(EpConfig::defaults().raw().num_chunks, 1);
    let ds = RouterConfig::deepseek_v3();
    assert_eq!((ds.num_experts(), ds.top_k(), ds.raw().num_groups, ds.raw().num_groups_kept), (256, 8, 8, 4));
    assert_eq!(ds.raw().score_func, ScoreFunc::Sigmoid.raw());
}

#[test]
fn presets_are_the_model_table() {
    for name in router::PRESETS {
        let c = RouterConfig::preset(name).unwrap_or_else(|| panic!("preset {name}"));
        c.check().unwrap();
        LayerConfig::from_sizes(c, 512, 128, Dtype::Bf16).shared_inter(256).check().unwrap();
    }
    assert_eq!(RouterConfig::preset("DeepSeek-V3").unwrap().route_scale(2.5).raw().route_scale, 2.5);
    assert_eq!(RouterConfig::preset("glm-4.5").unwrap().num_experts(), 160);
    assert!(RouterConfig::preset("llama").is_none());
    assert_eq!(RouterConfig::preset_uses_correction_bias("deepseek_v3"), Some(true));
    assert_eq!(RouterConfig::preset_uses_correction_bias("qwen3"), Some(false));
}

#[test]
fn size_queries() {
    let r = RouterConfig::qwen3();
    let small = r.forward_workspace_size(1).unwrap();
    assert!(r.forward_workspace_size(100_000).unwrap() >= small);
    let err = r.backward_workspace_size(-1).unwrap_err();
    assert_eq!(err.message, "moekit_router_backward_workspace_size: num_tokens = -1 is negative");
    // moekit_plan_max_rows is the documented worst case N + min(E_local, N)(A - 1).
    for (e, k, t, a) in [(8, 2, 10, 1), (8, 2, 10, 4), (257, 7, 13, 16), (16, 4, 0, 8)] {
        let c = PlanConfig::new(e, k).alignment(a);
        let n = (t * k) as i64;
        assert_eq!(c.max_rows(t as i64).unwrap(), n + n.min(e as i64) * (a as i64 - 1));
    }
    let cap = PlanConfig::new(16, 4).alignment(4).capacity(9, DropPolicy::ByWeight);
    assert_eq!(cap.max_rows(100).unwrap(), (16 * 12) as i64);
    let e = ExpertsConfig::new(8, 64, 32);
    assert!(e.backward_workspace_size(1024, false).unwrap() >= e.backward_workspace_size(1024, true).unwrap());
    let ep = EpConfig::new(2, 8, 2, 64, 16);
    assert!(ep.layout_size().unwrap().0 > 0);
    assert_eq!(ep.max_recv_rows().unwrap(), 32);
    assert!(ep.workspace_size(None).unwrap() > 0);
    match moekit::ep::nccl_version() {
        Ok(v) => assert!(v >= 20000),
        Err(e) => assert_eq!(e.status, Status::NotAvailable),
    }
}

#[test]
fn plan_arrays_are_carved_from_the_buffer() {
    let c = PlanConfig::new(12, 3).alignment(8);
    let t = 37;
    let bytes = c.buffer_size(t).unwrap();
    let buffer: DevicePtr<u8> = fake(1);
    let plan = TokenPlan::bind(&c, t, buffer, bytes).unwrap();
    let arrays = [
        (plan.expert_counts(), 12),
        (plan.expert_offsets(), 13),
        (plan.row_of_slot(), 3 * t as usize),
        (plan.slot_of_row(), plan.max_rows as usize),
        (plan.totals(), 3),
    ];
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (p, n) in arrays {
        assert_eq!(p.addr() % 256, 0);
        assert!(p.addr() >= buffer.addr() && p.addr() + 4 * n <= buffer.addr() + bytes);
        spans.push((p.addr(), p.addr() + 4 * n));
    }
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    let err = TokenPlan::bind(&c, t, buffer, bytes - 1).unwrap_err();
    assert_eq!(err.status, Status::InvalidArgument);
    assert!(err.message.starts_with("moekit_plan_bind:"));
}

#[test]
fn entry_points_reject_bad_arguments_before_the_device() {
    let cfg = RouterConfig::new(32, 4);
    let ws = Workspace::new(fake(9), 1 << 20);
    let base = ForwardArgs {
        num_tokens: 4,
        logits_dtype: Dtype::F32,
        logits: fake(2),
        logits_row_stride: 32,
        weights: fake(3),
        indices: fake(4),
        ..Default::default()
    };
    // Outputs that overlap.
    let overlapping = ForwardArgs { indices: base.weights.cast::<i32>().offset(4), ..base };
    let err = unsafe { router::forward(&cfg, &overlapping, ws, Stream::LEGACY) }.unwrap_err();
    assert_eq!(err.status, Status::InvalidArgument);
    assert!(err.message.starts_with("moekit_router_forward: weights = 0x") && err.message.contains("overlaps indices"));
    // A misaligned output.
    let misaligned = ForwardArgs { weights: base.weights.byte_offset(2), ..base };
    let err = unsafe { router::forward(&cfg, &misaligned, ws, Stream::LEGACY) }.unwrap_err();
    assert_eq!(err.status, Status::Misaligned);
    // A stride shorter than a row.
    let short = ForwardArgs { logits_row_stride: 16, ..base };
    let err = unsafe { router::forward(&cfg, &short, ws, Stream::LEGACY) }.unwrap_err();
    assert!(err.message.contains("logits_row_stride = 16 is less than num_experts = 32"));
    // A NULL output.
    let null = ForwardArgs { indices: DevicePtr::null(), ..base };
    let err = unsafe { router::forward(&cfg, &null, ws, Stream::LEGACY) }.unwrap_err();
    assert!(err.message.contains("indices is NULL"));
    // A workspace one byte short, and one off alignment.
    let need = cfg.forward_workspace_size(4).unwrap();
    if need > 0 {
        let err =
            unsafe { router::forward(&cfg, &base, Workspace::new(fake(9), need - 1), Stream::LEGACY) }.unwrap_err();
        assert_eq!(err.status, Status::WorkspaceTooSmall);
        let err =
            unsafe { router::forward(&cfg, &base, Workspace::new(fake::<u8>(9).byte_offset(8), need), Stream::LEGACY) }
                .unwrap_err();
        assert_eq!(err.status, Status::Misaligned);
    }
    // The small entry points.
    let err = unsafe { router::aux_loss(32, 40, fake(2), fake(3), fake(4), fake(5), Stream::LEGACY) }.unwrap_err();
    assert_eq!(err.message, "moekit_aux_loss_forward: top_k = 40 is outside [1, 32]");
    let err = unsafe { router::bias_update(0, 1e-3, false, fake(2), fake(3), true, Stream::LEGACY) }.unwrap_err();
    assert!(err.message.starts_with("moekit_router_bias_update: num_experts = 0"));
    let gate = router::FakeGateArgs {
        num_tokens: 4,
        num_experts: 8,
        top_k: 9,
        weights: fake(2),
        indices: fake(3),
        ..Default::default()
    };
    let err = unsafe { router::fake_gate(&gate, Stream::LEGACY) }.unwrap_err();
    assert!(err.message.starts_with("moekit_fake_gate_forward: top_k = 9"));
}

#[test]
fn tokens_experts_and_layer_entry_points_check_arguments() {
    let c = PlanConfig::new(8, 2);
    let t = 10;
    let plan = TokenPlan::bind(&c, t, fake(1), c.buffer_size(t).unwrap()).unwrap();
    let err = unsafe {
        plan.permute(64, Dtype::Bf16, fake(2), 32, DevicePtr::null(), fake(3), DevicePtr::null(), Stream::LEGACY)
    }
    .unwrap_err();
    assert!(err.message.contains("x_row_stride = 32"), "{}", err.message);
    let err =
        unsafe { plan.permute(64, Dtype::Bf16, fake(2), 64, fake(4), fake(3), DevicePtr::null(), Stream::LEGACY) }
            .unwrap_err();
    assert!(err.message.starts_with("moekit_tokens_permute:") && err.message.contains("weights"));

    let e = ExpertsConfig::new(4, 64, 32);
    let fwd = moekit::experts::ExpertsForward {
        max_rows: 40,
        expert_offsets: fake(1),
        xp: fake::<c_void>(2).byte_offset(8),
        w_gate_up: fake(3),
        w_down: fake(4),
        out: fake(5),
        ..Default::default()
    };
    let err = unsafe { e.forward(&fwd, Workspace::new(fake(9), 1 << 24), Stream::LEGACY) }.unwrap_err();
    assert_eq!(err.status, Status::Misaligned);
    assert!(err.message.contains("xp"));

    let layer_cfg =
        LayerConfig::from_sizes(RouterConfig::qwen3(), 256, 64, Dtype::Bf16).shared_inter(128).shared_gate(true);
    layer_cfg.check().unwrap();
    let bytes = layer_cfg.saved_size(100).unwrap();
    let (f, b) = layer_cfg.workspace_size(100).unwrap();
    assert!(bytes > 0 && f > 0 && b > 0);
    let view = layer_cfg.saved_view(100, fake(1), bytes).unwrap();
    assert_eq!(view.max_rows, PlanConfig::new(128, 8).max_rows(100).unwrap());
    assert!(!view.shared_out.is_null() && !view.expert_u.is_null());
    let err = layer_cfg.saved_view(100, fake(1), bytes - 1).unwrap_err();
    assert!(err.message.starts_with("moekit_layer_saved_view: saved_bytes"));
    let bad = LayerConfig::from_sizes(RouterConfig::qwen3(), 256, 64, Dtype::Bf16).shared_gate(true);
    let err = bad.check().unwrap_err();
    assert!(err.message.contains("config->shared_gate = 1 but config->shared is NULL"));
    let mut wrong = layer_cfg;
    wrong.experts = ExpertsConfig::new(64, 256, 64);
    let err = wrong.check().unwrap_err();
    assert!(err.message.contains("config->experts->num_experts = 64 differs from config->router->num_experts = 128"));
}
