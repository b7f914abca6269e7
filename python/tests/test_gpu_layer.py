"""The whole MoE layer (moekit.Layer, moekit.autograd.layer / MoE) against the same layer written in
plain PyTorch (float64, routed with the layer's own saved indices so near-ties cannot decide the
comparison): y, dx and every parameter gradient with the aux term, for layers shaped like the
model table's; then graph capture of forward + backward and the per-stage events."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the GPU tests compare against PyTorch)")

import moekit  # noqa: E402
import moekit.autograd as ma  # noqa: E402
import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda")]

RTOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2}

# name -> (router preset with overrides, LayerConfig.from_sizes options, correction bias?)
LAYERS = {
    "qwen3": (("qwen3", dict(num_experts=32)), dict(), False),
    "deepseek_v3": (("deepseek_v3", dict(num_experts=32, num_groups=4, num_groups_kept=2)),
                    dict(shared_inter=64), True),
    "gpt_oss": (("gpt_oss", dict(num_experts=16)), dict(activation="quick_geglu", act_limit=7.0, router_bias=True,
                                                        expert_bias=True), False),
    "qwen3_next_gated_shared": (("qwen3", dict(num_experts=32, top_k=4)),
                                dict(shared_inter=48, shared_gate=True, shared_bias=True), False),
    "glm45_after_down": (("glm45", dict(num_experts=32, top_k=4)), dict(weight_after_down=True, shared_inter=32), True),
    "nemotron_relu2": (("nemotron", dict(num_experts=32)), dict(activation="relu2", shared_inter=64), True),
    "mixtral_recompute_aligned": (("mixtral", dict()), dict(recompute=True, alignment=8), False),
}


def make(name, dtype, H=64, I=32, seed=0):
    (preset, overrides), opts, with_cb = LAYERS[name]
    rcfg = moekit.RouterConfig.preset(preset, **overrides)
    cfg = moekit.LayerConfig.from_sizes(rcfg, H, I, dtype=str(dtype), **opts)
    layer = moekit.Layer(cfg)
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for n in moekit.LAYER_PARAM_NAMES:
        shape = {"router_weight": (layer.E, H), "router_bias": (layer.E,), "w_gate_up": (layer.E, H, layer.NU),
                 "b_gate_up": (layer.E, layer.NU), "w_down": (layer.E, layer.I, H), "b_down": (layer.E, H),
                 "shared_w_gate_up": (H, layer.NU_s), "shared_b_gate_up": (layer.NU_s,),
                 "shared_w_down": (layer.I_s, H), "shared_b_down": (H,), "shared_gate_weight": (H,)}.get(n)
        have = {"router_bias": cfg.router_bias, "b_gate_up": cfg.expert_bias, "b_down": cfg.expert_bias,
                "shared_w_gate_up": cfg.shared is not None, "shared_w_down": cfg.shared is not None,
                "shared_b_gate_up": cfg.shared_bias, "shared_b_down": cfg.shared_bias,
                "shared_gate_weight": cfg.shared_gate}.get(n, True)
        if n == "correction_bias":
            params[n] = (0.05 * torch.randn(layer.E, generator=gen)).cuda() if with_cb else None
        elif have:
            fan_in = shape[-2] if len(shape) >= 2 else H
            scale = 0.1 if len(shape) == 1 or n.startswith("b_") else fan_in ** -0.5
            params[n] = (scale * torch.randn(*shape, generator=gen)).to(dtype).cuda()
        else:
            params[n] = None
    return cfg, layer, params


def reference(cfg, layer, params, x, mask, idx, gy, coeff, dtype):
    """y and the loss (y . gy + coeff * aux) of the plain-PyTorch layer; float64 leaves."""
    T = x.shape[0]
    leaves = {n: (v.double().clone().requires_grad_(n != "correction_bias") if v is not None else None)
              for n, v in params.items()}
    xd = x.double().clone().requires_grad_(True)
    zd = xd @ leaves["router_weight"].t()
    if leaves["router_bias"] is not None:
        zd = zd + leaves["router_bias"]
    if dtype != torch.float32 and not cfg.router_fp32:
        zd = zd + (zd.to(dtype).double() - zd).detach()  # the layer rounds the logits to dtype (straight-through)
    w, prob = ref.router(zd, cfg.router, idx, leaves["correction_bias"])
    pcfg = moekit.PlanConfig(num_experts=layer.E, top_k=layer.K, alignment=cfg.alignment)
    want = ref.plan(idx, pcfg, T, mask)
    R = pcfg.max_rows(T)
    xp = ref.permute(xd, want, R, layer.K)
    sor = torch.tensor(want["slot_of_row"] + [-1] * (R - want["total"]), device="cuda")
    rw = torch.where(sor >= 0, w.reshape(-1)[sor.clamp(min=0)], torch.zeros((), dtype=w.dtype, device="cuda"))
    yp = ref.experts(xp, want["offsets"], leaves["w_gate_up"], leaves["w_down"], cfg.experts, p=rw,
                     bgu=leaves["b_gate_up"], bd=leaves["b_down"])
    y = ref.combine(yp, want, None, T, layer.K)
    if cfg.shared is not None:
        s = ref.mlp(xd, leaves["shared_w_gate_up"], leaves["shared_w_down"], cfg.shared, leaves["shared_b_gate_up"],
                    leaves["shared_b_down"])
        if cfg.shared_gate:
            s = torch.sigmoid(xd @ leaves["shared_gate_weight"])[:, None] * s
        y = y + s
    load, S, N = ref.router_stats(idx, prob, layer.E, mask)
    aux = ref.aux_loss(load, S, N, layer.E, layer.K)
    loss = (y * gy.double()).sum() + coeff * aux
    loss.backward()
    return y, aux, xd.grad, {n: v.grad for n, v in leaves.items() if v is not None and v.requires_grad}


def close(got, want, dtype, what):
    scale = max(want.abs().max().item(), 1e-3)
    err = (got.double() - want).abs().max().item()
    assert err <= RTOL[dtype] * scale, "%s: max error %.3g over scale %.3g" % (what, err, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_plain_torch(name, dtype):
    cfg, layer, params = make(name, dtype, seed=81)
    T = 53
    gen = torch.Generator().manual_seed(82)
    x = torch.randn(T, cfg.hidden, generator=gen).to(dtype).cuda()
    mask = (torch.rand(T, generator=gen) > 0.1).cuda()
    gy = torch.randn(T, cfg.hidden, generator=gen).to(dtype).cuda()
    coeff = 0.05
    out = layer.forward(x, params, token_mask=mask, return_load=True, return_aux=True)
    view = layer.saved_view(T, out.saved)
    gx, grads = layer.backward(x, params, out.saved, gy, token_mask=mask, aux_loss_coeff=coeff)
    y_ref, aux_ref, gx_ref, grads_ref = reference(cfg, layer, params, x, mask, view.indices, gy, coeff, dtype)
    assert torch.equal(out.expert_load, view.expert_load)
    close(out.y, y_ref, dtype, "y")
    close(out.aux_loss.squeeze(), aux_ref.detach(), dtype, "aux_loss")
    close(gx, gx_ref, dtype, "dx")
    assert set(grads) == set(grads_ref), "gradients computed for every parameter the layer has"
    for n in grads:
        close(grads[n], grads_ref[n], dtype, "d" + n)


def test_autograd_layer_and_module_agree_with_the_direct_calls():
    cfg, layer, params = make("deepseek_v3", torch.bfloat16, seed=91)
    T = 64
    x = torch.randn(T, cfg.hidden, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(T, cfg.hidden, device="cuda", dtype=torch.bfloat16)
    out = layer.forward(x, params)
    gx, grads = layer.backward(x, params, out.saved, gy, aux_loss_coeff=0.01)
    leaves = {n: (v.clone().requires_grad_(n != "correction_bias") if v is not None else None)
              for n, v in params.items()}
    xl = x.clone().requires_grad_(True)
    acc = torch.zeros(layer.E, dtype=torch.int32, device="cuda")
    y, load, aux = ma.layer(xl, layer, leaves, aux_loss_coeff=0.01, load_accumulator=acc)
    y.backward(gy)
    assert torch.equal(y, out.y) and torch.equal(xl.grad, gx) and torch.equal(acc, load)
    for n, g in grads.items():
        assert torch.equal(leaves[n].grad, g), n
    moe = ma.MoE(cfg, use_correction_bias=True)
    with torch.no_grad():
        for n, p in moe.named_parameters():
            p.copy_(params[n])
        moe.correction_bias.copy_(params["correction_bias"])
    moe.aux_loss_coeff = 0.01
    y3 = moe(x.view(4, 16, cfg.hidden))
    y3.backward(gy.view(4, 16, cfg.hidden))
    assert torch.equal(y3.view(T, -1), out.y)
    for n, p in moe.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert int(moe.expert_load.sum()) == T * layer.K
    before = moe.correction_bias.clone()
    moe.update_bias(1e-3)
    assert int(moe.expert_load.abs().sum()) == 0 and not torch.equal(before, moe.correction_bias)


def test_layer_forward_and_backward_capture_into_one_graph():
    cfg, layer, params = make("qwen3_next_gated_shared", torch.bfloat16, seed=101)
    T = 128
    x = torch.randn(T, cfg.hidden, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(T, cfg.hidden, device="cuda", dtype=torch.bfloat16)
    saved = torch.empty(layer.saved_size(T), dtype=torch.uint8, device="cuda")
    fwd, bwd = layer.workspace_size(T)
    ws = torch.empty(max(fwd, bwd, 1), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    gx = torch.empty_like(x)
    grads = {n: torch.empty_like(v) for n, v in params.items() if v is not None and n != "correction_bias"}

    def step():
        layer.forward(x, params, y=y, saved=saved, workspace=ws)
        layer.backward(x, params, saved, gy, aux_loss_coeff=0.1, grad_x=gx, grads=grads, workspace=ws)

    step()
    eager = [y.clone(), gx.clone()] + [g.clone() for g in grads.values()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    for t in [y, gx] + list(grads.values()):
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, [y, gx] + list(grads.values())):
        assert torch.equal(a, b)


def test_stage_events():
    cfg, layer, params = make("deepseek_v3", torch.bfloat16, seed=111)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * moekit._capi.MOEKIT_LAYER_NUM_STAGES)]
    layer.set_stage_events(events)
    x = torch.randn(256, cfg.hidden, device="cuda", dtype=torch.bfloat16)
    out = layer.forward(x, params)
    layer.backward(x, params, out.saved, torch.ones_like(x))
    torch.cuda.synchronize()
    stages = (moekit.LayerStage.PROJECTION, moekit.LayerStage.EXPERTS, moekit.LayerStage.EXPERTS_BACKWARD)
    for s in stages:  # grouped GEMMs over 256 tokens take measurable time; elapsed_time raises if unrecorded
        assert events[2 * s].elapsed_time(events[2 * s + 1]) > 0.0
    for a, b in zip(stages, stages[1:]):  # recorded in stream order
        assert events[2 * a + 1].elapsed_time(events[2 * b]) >= 0.0
    layer.set_stage_events(None)
    with pytest.raises(moekit.InvalidArgumentError):
        layer.set_stage_events(events[:3])
