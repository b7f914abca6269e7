"""The plan, permute and combine through the Python binding against plain PyTorch: the plan's
arrays exactly, permuted rows bit for bit, the combine within tolerance, and the gradients of
moekit.autograd.permute / combine against torch.autograd of index ops."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the GPU tests compare against PyTorch)")

import moekit  # noqa: E402
import moekit.autograd as ma  # noqa: E402
import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda")]

PLANS = [dict(num_experts=8, top_k=2), dict(num_experts=16, top_k=4, alignment=8),
         dict(num_experts=64, top_k=6, local_expert_begin=16, num_local_experts=16, alignment=4),
         dict(num_experts=257, top_k=7, alignment=16)]


def routing(T, E, K, seed, mask=True):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :K].to(torch.int32).cuda()
    w = torch.rand(T, K, generator=gen).cuda()
    m = (torch.rand(T, generator=gen) > 0.25).cuda() if mask else None
    return idx, w, m


@pytest.mark.parametrize("pc", PLANS, ids=lambda p: "E%d-K%d" % (p["num_experts"], p["top_k"]))
def test_plan_matches_a_stable_sort(pc):
    cfg = moekit.PlanConfig(**pc)
    T = 53
    idx, w, m = routing(T, cfg.num_experts, cfg.top_k, seed=1)
    plan = moekit.plan_build(idx, cfg, token_mask=m)
    want = ref.plan(idx, cfg, T, m)
    total = want["total"]
    assert plan.totals.tolist() == [total, 0, 0]
    assert plan.expert_counts.tolist() == want["counts"]
    assert plan.expert_offsets.tolist() == want["offsets"]
    assert plan.row_of_slot.tolist() == want["row_of_slot"]
    assert plan.slot_of_row[:total].tolist() == want["slot_of_row"]
    assert plan.max_rows == cfg.max_rows(T) >= total
    # Rebuilt in place (what a captured graph does) it gives the same arrays.
    before = plan.buffer.clone()
    assert moekit.plan_build(idx, cfg, token_mask=m, plan=plan) is plan
    assert torch.equal(plan.buffer, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_permute_and_combine_forward(dtype):
    cfg = moekit.PlanConfig(num_experts=16, top_k=4, alignment=8)
    T, H = 45, 72
    idx, w, m = routing(T, 16, 4, seed=2)
    plan = moekit.plan_build(idx, cfg, token_mask=m)
    want = ref.plan(idx, cfg, T, m)
    x = torch.randn(T, H, dtype=dtype, device="cuda")
    xp, rw = moekit.permute(x, plan, weights=w)
    total = want["total"]
    assert xp.shape == (plan.max_rows, H) and rw.shape == (plan.max_rows,)
    assert torch.equal(xp[:total], ref.permute(x, want, plan.max_rows, 4)[:total])
    sor = torch.tensor(want["slot_of_row"], device="cuda")
    want_rw = torch.where(sor >= 0, w.reshape(-1)[sor.clamp(min=0)], torch.zeros_like(sor, dtype=torch.float32))
    assert torch.equal(rw[:total], want_rw)
    yp = torch.randn(plan.max_rows, H, dtype=dtype, device="cuda")
    for weights in (w, None):
        y = moekit.combine(yp, plan, weights=weights)
        y_ref = ref.combine(yp.double(), want, None if weights is None else weights.double(), T, 4)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y.double(), y_ref, **tol)
        assert y.dtype == dtype


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_autograd_permute_combine_match_torch(weighted):
    cfg = moekit.PlanConfig(num_experts=8, top_k=2, alignment=4)
    T, H = 31, 40
    idx, w, m = routing(T, 8, 2, seed=3)
    plan = moekit.plan_build(idx, cfg, token_mask=m)
    want = ref.plan(idx, cfg, T, m)
    x0 = torch.randn(T, H, device="cuda")
    w0 = w.clone()
    proj = torch.randn(H, H, device="cuda") / H ** 0.5
    gy = torch.randn(T, H, device="cuda")

    def run(x, wt, permute, combine):
        pr = proj.to(x.dtype)  # the reference runs in float64: matmul does not promote
        if weighted:   # weights enter twice: as row weights inside the "expert" and in the combine
            xp, rw = permute(x, wt)
            return combine((xp @ pr) * (1.0 + rw[:, None]), wt)
        return combine(permute(x, None) @ pr, None)

    x = x0.clone().requires_grad_(True)
    wt = w0.clone().requires_grad_(True)
    y = run(x, wt, lambda a, b: ma.permute(a, plan, b), lambda a, b: ma.combine(a, plan, b))
    (y * gy).sum().backward()
    xr = x0.double().clone().requires_grad_(True)
    wr = w0.double().clone().requires_grad_(True)

    def rperm(a, b):
        xp = ref.permute(a, want, plan.max_rows, 2)
        if b is None:
            return xp
        sor = torch.tensor(want["slot_of_row"] + [-1] * (plan.max_rows - want["total"]), device="cuda")
        rw = torch.where(sor >= 0, b.reshape(-1)[sor.clamp(min=0)], torch.zeros((), dtype=b.dtype, device="cuda"))
        return xp, rw

    yr = run(xr, wr, rperm, lambda a, b: ref.combine(a, want, b, T, 2))
    ((yr * gy.double()).sum()).backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    if weighted:
        torch.testing.assert_close(wt.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)
    else:
        assert wt.grad is None


def test_zero_tokens():
    cfg = moekit.PlanConfig(num_experts=8, top_k=2)
    idx = torch.empty(0, 2, dtype=torch.int32, device="cuda")
    plan = moekit.plan_build(idx, cfg)
    assert plan.totals.tolist() == [0, 0, 0] and plan.expert_offsets.tolist() == [0] * 9
    xp = moekit.permute(torch.empty(0, 16, device="cuda"), plan)
    assert xp.shape == (0, 16)
    assert moekit.combine(xp, plan).shape == (0, 16)
    g = moekit.combine_backward(torch.empty(0, 16, device="cuda"), plan, weights=torch.empty(0, 2, device="cuda"),
                                yp=xp)
    assert g.grad_yp.shape == (0, 16) and g.grad_weights.shape == (0, 2)
    assert plan.row_of_slot.shape == (0,) and isinstance(plan.row_of_slot, torch.Tensor)
