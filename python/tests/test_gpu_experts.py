"""The grouped experts and the dense MLP through the Python binding against plain PyTorch (a float64
per-expert loop / matmuls): forward outputs, and every gradient of moekit.autograd.grouped_experts /
mlp against torch.autograd of the reference, for each activation, both weight placements, biases,
empty experts and rows past the routed total."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the GPU tests compare against PyTorch)")

import moekit  # noqa: E402
import moekit.autograd as ma  # noqa: E402
import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda")]

# Relative tolerances against the float64 reference, scaled by each tensor's largest magnitude.
RTOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}

ACTIVATIONS = [dict(activation="swiglu"), dict(activation="swiglu", act_limit=1.5), dict(activation="relu2"),
               dict(activation="quick_geglu", act_limit=7.0), dict(activation="geglu"),
               dict(activation="swiglu_oai", act_limit=2.0)]


def close(got, want, dtype, what):
    scale = max(want.abs().max().item(), 1e-3)
    err = (got.double() - want).abs().max().item()
    assert err <= RTOL[dtype] * scale, "%s: max error %.3g over scale %.3g (dtype %s)" % (what, err, scale, dtype)


def segments(E, R, seed):
    """Offsets with some empty experts and slack rows past the total."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 9, (E,), generator=gen)
    sizes[1] = 0
    sizes[-1] = 0
    offsets = [0]
    for s in sizes.tolist():
        offsets.append(offsets[-1] + s)
    assert offsets[-1] <= R
    return offsets


def expert_tensors(E, H, I, NU, R, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).cuda()

    t = dict(xp=rnd(R, H), w_gate_up=rnd(E, H, NU, scale=H ** -0.5), w_down=rnd(E, I, H, scale=I ** -0.5),
             row_weights=torch.rand(R, generator=gen).cuda())
    if bias:
        t["b_gate_up"] = rnd(E, NU, scale=0.1)
        t["b_down"] = rnd(E, H, scale=0.1)
    return t


@pytest.mark.parametrize("after", [False, True], ids=["weight-before-down", "weight-after-down"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a["activation"] + ("-L" if a.get("act_limit") else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_grouped_experts_forward_and_backward(dtype, act, after):
    E, H, I, R = 6, 64, 32, 48
    cfg = moekit.ExpertsConfig(num_experts=E, hidden=H, inter=I, dtype=str(dtype), weight_after_down=after, **act)
    NU = cfg.nu
    bias = act["activation"] in ("swiglu", "quick_geglu")
    t = expert_tensors(E, H, I, NU, R, dtype, bias, seed=11)
    offsets = segments(E, R, seed=12)
    off = torch.tensor(offsets, dtype=torch.int32, device="cuda")
    names = ["xp", "row_weights", "w_gate_up", "w_down"] + (["b_gate_up", "b_down"] if bias else [])
    mk = {n: t[n].clone().requires_grad_(True) for n in names}
    out = ma.grouped_experts(mk["xp"], off, mk["w_gate_up"], mk["w_down"], cfg, row_weights=mk["row_weights"],
                             b_gate_up=mk.get("b_gate_up"), b_down=mk.get("b_down"))
    assert out.shape == (R, H) and out.dtype == dtype
    rf = {n: t[n].double().clone().requires_grad_(True) for n in names}
    want = ref.experts(rf["xp"], offsets, rf["w_gate_up"], rf["w_down"], cfg, p=rf["row_weights"],
                       bgu=rf.get("b_gate_up"), bd=rf.get("b_down"))
    close(out[:offsets[-1]], want[:offsets[-1]], dtype, "out")
    assert float(out[offsets[-1]:].abs().sum()) == 0.0  # rows past the total: never written, zero-filled
    g = torch.randn(R, H, generator=torch.Generator().manual_seed(13)).to(dtype).cuda()
    g[offsets[-1]:] = 0  # what a combine's backward gives rows that have no slot
    (out.double() * g.double()).sum().backward()
    (want * g.double()).sum().backward()
    for n in names:
        close(mk[n].grad, rf[n].grad, dtype, "grad " + n)
    # Experts without rows get exactly zero weight gradients.
    for e in (1, E - 1):
        assert float(mk["w_gate_up"].grad[e].abs().sum()) == 0.0 and float(mk["w_down"].grad[e].abs().sum()) == 0.0


def test_grouped_experts_recompute_equals_saved_u():
    E, H, I, R = 4, 64, 32, 40
    t = expert_tensors(E, H, I, 2 * I, R, torch.bfloat16, False, seed=21)
    off = torch.tensor(segments(E, R, seed=22), dtype=torch.int32, device="cuda")
    g = torch.randn(R, H, device="cuda").to(torch.bfloat16)
    grads = []
    for save_u in (True, False):
        leaves = [t[n].clone().requires_grad_(True) for n in ("xp", "w_gate_up", "w_down")]
        out = ma.grouped_experts(leaves[0], off, leaves[1], leaves[2], row_weights=t["row_weights"], save_u=save_u)
        out.backward(g)
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_functional_experts_api_and_determinism():
    E, H, I, R = 4, 64, 32, 40
    t = expert_tensors(E, H, I, 2 * I, R, torch.bfloat16, True, seed=31)
    off = torch.tensor(segments(E, R, seed=32), dtype=torch.int32, device="cuda")
    kw = dict(row_weights=t["row_weights"], b_gate_up=t["b_gate_up"], b_down=t["b_down"])
    out1, u1 = moekit.experts_forward(t["xp"], off, t["w_gate_up"], t["w_down"], **kw)
    out2, u2 = moekit.experts_forward(t["xp"], off, t["w_gate_up"], t["w_down"], **kw)
    total = int(off[-1])
    assert torch.equal(out1[:total], out2[:total]) and torch.equal(u1[:total], u2[:total])
    g = torch.randn(R, H, device="cuda").to(torch.bfloat16)
    a = moekit.experts_backward(g, t["xp"], off, t["w_gate_up"], t["w_down"], u=u1, **kw)
    b = moekit.experts_backward(g, t["xp"], off, t["w_gate_up"], t["w_down"], u=u1, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y) if x.shape[0] != R else torch.equal(x[:total], y[:total])
    only = moekit.experts_backward(g, t["xp"], off, t["w_gate_up"], t["w_down"], u=u1, needs=["w_down"], **kw)
    assert only.grad_xp is None and only.grad_w_gate_up is None and torch.equal(only.grad_w_down, a.grad_w_down)


MLP_CASES = [dict(activation="swiglu", weight_layout="in_out"), dict(activation="swiglu", weight_layout="out_in"),
             dict(activation="relu2", weight_layout="in_out"), dict(activation="quick_geglu", act_limit=7.0,
                                                                    weight_layout="out_in")]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: c["activation"] + "-" + c["weight_layout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_mlp_forward_and_backward(dtype, case, bias):
    T, H, I = 37, 64, 48
    cfg = moekit.MlpConfig(hidden=H, inter=I, dtype=str(dtype), **case)
    NU = cfg.nu
    out_in = case["weight_layout"] == "out_in"
    gen = torch.Generator().manual_seed(41)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).cuda()

    t = dict(x=rnd(T, H), w_gate_up=rnd(*((NU, H) if out_in else (H, NU)), scale=H ** -0.5),
             w_down=rnd(*((H, I) if out_in else (I, H)), scale=I ** -0.5))
    if bias:
        t["b_gate_up"] = rnd(NU, scale=0.1)
        t["b_down"] = rnd(H, scale=0.1)
    mk = {n: v.clone().requires_grad_(True) for n, v in t.items()}
    y = ma.mlp(mk["x"], mk["w_gate_up"], mk["w_down"], cfg, b_gate_up=mk.get("b_gate_up"), b_down=mk.get("b_down"))
    rf = {n: v.double().clone().requires_grad_(True) for n, v in t.items()}
    want = ref.mlp(rf["x"], rf["w_gate_up"], rf["w_down"], cfg, rf.get("b_gate_up"), rf.get("b_down"))
    close(y, want, dtype, "y")
    g = torch.randn(T, H, generator=gen).to(dtype).cuda()
    y.backward(g)
    want.backward(g.double())
    for n in t:
        assert mk[n].grad.shape == t[n].shape
        close(mk[n].grad, rf[n].grad, dtype, "grad " + n)


def test_mlp_config_from_shapes_and_handles():
    T, H, I = 16, 64, 32
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    wgu = torch.randn(H, 2 * I, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    wd = torch.randn(I, H, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    h = moekit.mlp_handle()
    assert h is moekit.mlp_handle(torch.cuda.current_device())
    y1, u1 = moekit.mlp_forward(x, wgu, wd)
    with moekit.MlpHandle() as own:
        y2, u2 = moekit.mlp_forward(x, wgu, wd, handle=own, save_u=False)
    assert u2 is None and torch.equal(y1, y2) and u1.shape == (T, 2 * I)
    with pytest.raises(moekit.InvalidArgumentError):
        own.value
