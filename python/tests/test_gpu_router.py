"""The router through the Python binding against plain PyTorch (torch_reference.py): forward
(indices exactly where the selection is clear by a margin, weights and aux statistics within
tolerance), the backward through moekit.autograd.route with and without the aux term against
torch.autograd, the bias update and the fake gate."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the GPU tests compare against PyTorch)")

import moekit  # noqa: E402
import moekit.autograd as ma  # noqa: E402
import torch_reference as ref  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda")]

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
       torch.float16: dict(rtol=2e-3, atol=2e-4)}


def distinct_logits(T, E, dtype, gen):
    """Each row a random permutation of E evenly spaced values in [-2, 2): no ties, and exactly
    the same values in fp32 and after rounding to bf16 / f16 for E <= 256."""
    base = (torch.arange(E, dtype=torch.float64) - E / 2) * (4.0 / E)
    perm = torch.argsort(torch.rand(T, E, generator=gen), dim=1)
    return base[perm].to(dtype).cuda()


CASES = [(name, False) for name in moekit.ROUTER_PRESETS] + [
    ("sqrt_softplus", True), ("neg_inf_groups", True), ("topn_groups", True), ("weights_use_bias", True),
    ("max_groups_no_bias", False)]


def make_config(name):
    if name in moekit.ROUTER_PRESETS:
        return moekit.RouterConfig.preset(name), moekit.preset_uses_correction_bias(name)
    extra = {
        "sqrt_softplus": (dict(num_experts=256, top_k=8, score_func="sqrt_softplus", normalize=True,
                               route_scale=1.5), True),
        "neg_inf_groups": (dict(num_experts=256, top_k=8, score_func="sigmoid", num_groups=8, num_groups_kept=4,
                                group_mask="neg_inf", normalize=True), True),
        "topn_groups": (dict(num_experts=128, top_k=8, num_groups=8, num_groups_kept=3, group_score="topn_sum",
                             group_score_topn=4), True),
        "weights_use_bias": (dict(num_experts=256, top_k=8, score_func="sigmoid", weights_use_bias=True,
                                  normalize=True, route_scale=2.5), True),
        "max_groups_no_bias": (dict(num_experts=64, top_k=4, score_func="sigmoid", num_groups=8,
                                    num_groups_kept=2), False),
    }[name]
    return moekit.RouterConfig(**extra[0]), extra[1]


def inputs(name, dtype, T=67, seed=0, masked=True):
    cfg, with_bias = make_config(name)
    gen = torch.Generator().manual_seed(seed)
    z = distinct_logits(T, cfg.num_experts, dtype, gen)
    bias = (0.05 * torch.randn(cfg.num_experts, generator=gen)).cuda() if with_bias else None
    mask = (torch.rand(T, generator=gen) > 0.2).cuda() if masked else None
    return cfg, z, bias, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_forward_matches_torch(name, dtype):
    cfg, z, bias, mask = inputs(name, dtype)
    out = moekit.router_forward(z, cfg, correction_bias=bias, token_mask=mask, return_aux_stats=True)
    assert out.weights.dtype == torch.float32 and out.indices.dtype == torch.int32
    assert out.weights.shape == (z.shape[0], cfg.top_k) and out.expert_load.shape == (cfg.num_experts,)
    want_idx, clear = ref.router_select(z, cfg, bias)
    assert clear.float().mean() > 0.9, "the generator should keep most rows away from near-ties"
    assert torch.equal(out.indices.long()[clear], want_idx[clear])
    assert ((out.indices >= 0) & (out.indices < cfg.num_experts)).all()
    w, p = ref.router(z, cfg, out.indices, bias)
    torch.testing.assert_close(out.weights.double(), w, rtol=2e-5, atol=2e-6)
    load, S, N = ref.router_stats(out.indices, p, cfg.num_experts, mask)
    assert torch.equal(out.expert_load.long(), load)
    torch.testing.assert_close(out.aux_score_sum.double(), S, rtol=1e-4, atol=1e-5)
    assert out.aux_token_count.item() == N
    aux = moekit.aux_loss(out.expert_load, out.aux_score_sum, out.aux_token_count, cfg.top_k)
    torch.testing.assert_close(aux.double().squeeze(), ref.aux_loss(load, S, N, cfg.num_experts, cfg.top_k),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("coeff", [0.0, 0.37], ids=["no-aux", "aux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen3", "gpt_oss", "mixtral", "weights_use_bias", "sqrt_softplus"])
def test_backward_matches_torch_autograd(name, dtype, coeff):
    cfg, z, bias, mask = inputs(name, dtype, seed=1)
    gen = torch.Generator().manual_seed(7)
    gw = torch.randn(z.shape[0], cfg.top_k, generator=gen).cuda()
    zm = z.clone().requires_grad_(True)
    r = ma.route(zm, cfg, correction_bias=bias, token_mask=mask, aux_loss_coeff=coeff)
    assert r.weights.requires_grad and not r.indices.requires_grad
    (r.weights * gw).sum().backward()
    zr = z.double().clone().requires_grad_(True)
    w, p = ref.router(zr, cfg, r.indices, bias)
    loss = (w * gw.double()).sum()
    if coeff:
        load, S, N = ref.router_stats(r.indices, p, cfg.num_experts, mask)
        assert torch.equal(r.expert_load.long(), load)
        loss = loss + coeff * ref.aux_loss(load, S, N, cfg.num_experts, cfg.top_k)
        assert r.aux_loss is not None and r.aux_loss.shape == (1,)
    loss.backward()
    assert zm.grad.dtype == dtype
    scale = zr.grad.abs().max().item()
    torch.testing.assert_close(zm.grad.double(), zr.grad, rtol=TOL[dtype]["rtol"],
                               atol=TOL[dtype]["atol"] * max(scale, 1.0))


def test_backward_with_only_the_aux_term():
    cfg, z, bias, mask = inputs("qwen3", torch.float32, seed=2)
    out = moekit.router_forward(z, cfg, token_mask=mask, return_aux_stats=True)
    g = moekit.router_backward(z, out.indices, cfg, None, token_mask=mask, aux_loss_coeff=1.0,
                               expert_load=out.expert_load, aux_token_count=out.aux_token_count)
    zr = z.double().clone().requires_grad_(True)
    _, p = ref.router(zr, cfg, out.indices)
    load, S, N = ref.router_stats(out.indices, p, cfg.num_experts, mask)
    ref.aux_loss(load, S, N, cfg.num_experts, cfg.top_k).backward()
    torch.testing.assert_close(g.double(), zr.grad, rtol=1e-4, atol=1e-7)


def test_strided_logits_rows_and_given_outputs():
    cfg, z, bias, mask = inputs("deepseek_v3", torch.float32, seed=3)
    T, E = z.shape
    wide = torch.full((T, E + 40), float("nan"), device=z.device)
    wide[:, 5:5 + E] = z
    view = wide[:, 5:5 + E]
    assert view.stride() == (E + 40, 1)
    w = torch.full((T, cfg.top_k), -7.0, device=z.device)
    idx = torch.full((T, cfg.top_k), -7, dtype=torch.int32, device=z.device)
    out = moekit.router_forward(view, cfg, correction_bias=bias, weights=w, indices=idx, return_load=False)
    assert out.weights is w and out.indices is idx and out.expert_load is None
    again = moekit.router_forward(z, cfg, correction_bias=bias)
    assert torch.equal(w, again.weights) and torch.equal(idx, again.indices)


def test_deterministic_and_zero_tokens():
    cfg, z, bias, mask = inputs("glm45", torch.bfloat16, T=1000, seed=4)
    a = moekit.router_forward(z, cfg, correction_bias=bias, token_mask=mask, return_aux_stats=True)
    b = moekit.router_forward(z, cfg, correction_bias=bias, token_mask=mask, return_aux_stats=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    e = moekit.router_forward(z[:0], cfg, correction_bias=bias, return_aux_stats=True)
    assert e.weights.shape == (0, cfg.top_k) and int(e.expert_load.abs().sum()) == 0
    assert e.aux_token_count.item() == 0 and float(e.aux_score_sum.abs().sum()) == 0.0


def test_accumulated_load_and_bias_update():
    cfg, z, bias, mask = inputs("deepseek_v3", torch.float32, T=256, seed=5)
    acc = torch.zeros(cfg.num_experts, dtype=torch.int32, device=z.device)
    total = torch.zeros_like(acc)
    for seed in range(3):
        _, zi, _, mi = inputs("deepseek_v3", torch.float32, T=256, seed=10 + seed)
        r = ma.route(zi, cfg, correction_bias=bias, token_mask=mi, load_accumulator=acc)
        total += r.expert_load
    assert torch.equal(acc, total) and int(acc.sum()) > 0
    b = bias.clone()
    load = acc.clone()
    moekit.bias_update(b, load, 1e-3, reset_load=True)
    mean = acc.double().mean()
    want = bias.double() + 1e-3 * torch.sign(mean - acc.double())
    torch.testing.assert_close(b.double(), want, rtol=0, atol=1e-7)
    assert int(load.abs().sum()) == 0


def test_fake_gate_noise_free_is_round_robin():
    T, E, K, skip = 33, 16, 4, 2
    out = moekit.fake_gate(T, E, K, skip_experts=skip, like=torch.empty(0, device="cuda"))
    t = torch.arange(T, device="cuda")[:, None]
    k = torch.arange(K, device="cuda")[None, :]
    assert torch.equal(out.indices.long(), (t * K + k) % (E - skip) + skip)
    assert torch.equal(out.weights, torch.full((T, K), 1.0 / K, device="cuda"))
    assert int(out.expert_load.sum()) == T * K
    noisy = moekit.fake_gate(T, E, K, noise=0.5, seed=3, offset=9)
    again = moekit.fake_gate(T, E, K, noise=0.5, seed=3, offset=9)
    assert torch.equal(noisy.indices, again.indices) and torch.equal(noisy.weights, again.weights)
