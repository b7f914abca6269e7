"""A MoE layer composed from the binding's autograd Functions (router -> plan -> permute -> grouped
experts -> combine, plus a shared MLP) against the same layer in plain PyTorch, forward and every
gradient; then what the binding promises around the calls: CUDA graph capture of the functional
calls, a side stream, CuPy arrays in and out, and a DLPack-only producer."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the GPU tests compare against PyTorch)")

import moekit  # noqa: E402
import moekit.autograd as ma  # noqa: E402
import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda")]


def layer_params(E, H, I, Is, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).cuda()

    return dict(router=rnd(E, H, scale=H ** -0.5), w_gate_up=rnd(E, H, 2 * I, scale=H ** -0.5),
                w_down=rnd(E, I, H, scale=I ** -0.5), shared_gate_up=rnd(H, 2 * Is, scale=H ** -0.5),
                shared_down=rnd(Is, H, scale=Is ** -0.5))


def moekit_layer(x, p, rcfg, pcfg, mask, coeff):
    z = x @ p["router"].t()
    r = ma.route(z, rcfg, token_mask=mask, aux_loss_coeff=coeff)
    plan = moekit.plan_build(r.indices, pcfg, token_mask=mask)
    xp, rw = ma.permute(x, plan, r.weights)
    yp = ma.grouped_experts(xp, plan.expert_offsets, p["w_gate_up"], p["w_down"], row_weights=rw)
    y = ma.combine(yp, plan) + ma.mlp(x, p["shared_gate_up"], p["shared_down"])
    return y, r, plan


def torch_layer(x, p, rcfg, pcfg, mask, coeff, indices):
    """The same layer in plain PyTorch (float64), routed with moekit's indices; returns (y, loss
    term of the aux loss)."""
    T = x.shape[0]
    z = x @ p["router"].t()
    w, prob = ref.router(z, rcfg, indices)
    want = ref.plan(indices, pcfg, T, mask)
    R = pcfg.max_rows(T)
    xp = ref.permute(x, want, R, rcfg.top_k)
    sor = torch.tensor(want["slot_of_row"] + [-1] * (R - want["total"]), device="cuda")
    rw = torch.where(sor >= 0, w.reshape(-1)[sor.clamp(min=0)], torch.zeros((), dtype=w.dtype, device="cuda"))
    ecfg = moekit.ExpertsConfig(num_experts=rcfg.num_experts, hidden=x.shape[1], inter=p["w_down"].shape[1])
    yp = ref.experts(xp, want["offsets"], p["w_gate_up"], p["w_down"], ecfg, p=rw)
    scfg = moekit.MlpConfig(hidden=x.shape[1], inter=p["shared_down"].shape[0])
    y = ref.combine(yp, want, None, T, rcfg.top_k) + ref.mlp(x, p["shared_gate_up"], p["shared_down"], scfg)
    load, S, N = ref.router_stats(indices, prob, rcfg.num_experts, mask)
    return y, coeff * ref.aux_loss(load, S, N, rcfg.num_experts, rcfg.top_k)


@pytest.mark.parametrize("preset", ["qwen3", "deepseek_v3", "mixtral"])
def test_composed_layer_matches_plain_torch(preset):
    T, H, I, Is = 57, 64, 32, 48
    rcfg = moekit.RouterConfig.preset(preset)
    if preset == "deepseek_v3":
        rcfg = rcfg.replace(num_experts=32, num_groups=4, num_groups_kept=2)
    E, K = rcfg.num_experts, rcfg.top_k
    pcfg = moekit.PlanConfig(num_experts=E, top_k=K)
    p = layer_params(E, H, I, Is, seed=51)
    gen = torch.Generator().manual_seed(52)
    x0 = torch.randn(T, H, generator=gen).cuda()
    mask = (torch.rand(T, generator=gen) > 0.1).cuda()
    g = torch.randn(T, H, generator=gen).cuda()
    coeff = 0.01
    x = x0.clone().requires_grad_(True)
    mp = {n: v.clone().requires_grad_(True) for n, v in p.items()}
    y, r, plan = moekit_layer(x, mp, rcfg, pcfg, mask, coeff)
    (y * g).sum().backward()
    xr = x0.double().clone().requires_grad_(True)
    rp = {n: v.double().clone().requires_grad_(True) for n, v in p.items()}
    yr, aux = torch_layer(xr, rp, rcfg, pcfg, mask, coeff, r.indices)
    ((yr * g.double()).sum() + aux).backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    for n in p:
        scale = max(rp[n].grad.abs().max().item(), 1e-3)
        torch.testing.assert_close(mp[n].grad.double(), rp[n].grad, rtol=1e-4, atol=1e-4 * scale, msg=n)


def test_functional_calls_capture_into_a_cuda_graph():
    T, H, I = 96, 64, 32
    rcfg = moekit.RouterConfig.preset("qwen3", num_experts=16, top_k=4)
    pcfg = moekit.PlanConfig(num_experts=16, top_k=4, alignment=8)
    ecfg = moekit.ExpertsConfig(num_experts=16, hidden=H, inter=I, dtype="bf16")
    p = layer_params(16, H, I, 32, seed=61, dtype=torch.bfloat16)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(T, 16, device="cuda")

    def forward():
        r = moekit.router_forward(z, rcfg)
        plan = moekit.plan_build(r.indices, pcfg, plan=static_plan)
        xp, rw = moekit.permute(x, plan, weights=r.weights)
        yp, _ = moekit.experts_forward(xp, plan.expert_offsets, p["w_gate_up"], p["w_down"], ecfg, row_weights=rw,
                                       save_u=False)
        return moekit.combine(yp, plan)

    static_plan = moekit.plan_alloc(pcfg, T, like=x)
    eager = forward().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()  # warm up on the capture stream (torch's advice before capturing)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = forward()
    z.copy_(torch.randn(T, 16, device="cuda"))
    x.copy_(torch.randn(T, H, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, forward())
    assert not torch.equal(y, eager)


def test_side_stream_and_explicit_stream_argument():
    rcfg = moekit.RouterConfig.preset("mixtral")
    z = torch.randn(4096, 8, device="cuda")
    want = moekit.router_forward(z, rcfg)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        on_current = moekit.router_forward(z, rcfg)      # picks up the current (side) stream
    explicit = moekit.router_forward(z, rcfg, stream=s)  # or takes it as an argument
    s.synchronize()
    torch.cuda.synchronize()
    for a, b, c in zip(want[:3], on_current[:3], explicit[:3]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_cupy_arrays_in_and_out():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    rcfg = moekit.RouterConfig.preset("qwen3")
    zt = torch.randn(100, 128, device="cuda")
    z = cupy.asarray(zt)  # through __cuda_array_interface__, same memory
    out = moekit.router_forward(z, rcfg)
    assert isinstance(out.weights, cupy.ndarray) and out.indices.dtype == cupy.int32
    want = moekit.router_forward(zt, rcfg)
    torch.cuda.synchronize()
    cupy.cuda.get_current_stream().synchronize()
    assert torch.equal(torch.as_tensor(out.indices, device="cuda"), want.indices)
    assert torch.equal(torch.as_tensor(out.weights, device="cuda"), want.weights)
    plan = moekit.plan_build(out.indices, moekit.PlanConfig(num_experts=128, top_k=8))
    assert isinstance(plan.expert_offsets, cupy.ndarray) and int(plan.totals[0]) == 800
    x = cupy.asarray(torch.randn(100, 64, device="cuda", dtype=torch.float16))
    xp = moekit.permute(x, plan)
    y = moekit.combine(xp, plan)  # unweighted: each token summed over its 8 rows
    torch.testing.assert_close(torch.as_tensor(y, device="cuda").float(),
                               8 * torch.as_tensor(x, device="cuda").float(), rtol=1e-2, atol=1e-2)


class DlpackOnly(object):
    """Exposes nothing but the DLPack protocol (as JAX and others do)."""

    def __init__(self, t):
        self._t = t

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


def test_dlpack_producer():
    rcfg = moekit.RouterConfig.preset("mixtral")
    z = torch.randn(64, 8, device="cuda")
    w = torch.empty(64, 2, device="cuda")
    idx = torch.empty(64, 2, dtype=torch.int32, device="cuda")
    ws = torch.empty(rcfg.forward_workspace_size(64) + 1, dtype=torch.uint8, device="cuda")
    out = moekit.router_forward(DlpackOnly(z), rcfg, weights=DlpackOnly(w), indices=DlpackOnly(idx),
                                return_load=False, workspace=DlpackOnly(ws), stream=torch.cuda.current_stream())
    assert isinstance(out.weights, DlpackOnly)
    want = moekit.router_forward(z, rcfg)
    assert torch.equal(w, want.weights) and torch.equal(idx, want.indices)
    with pytest.raises(moekit.InvalidArgumentError) as e:  # no framework to allocate outputs from
        moekit.router_forward(DlpackOnly(z), rcfg)
    assert "pass every output buffer explicitly" in e.value.message
