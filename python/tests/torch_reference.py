"""Plain PyTorch implementations of moekit's semantics (docs/semantics.md, the headers' formulas),
written the obvious way with torch ops and differentiated by torch.autograd: the GPU tests compare
moekit's forward results and its backward (through moekit.autograd) against these.

Computation runs in float64 unless a function says otherwise, so the reference carries no rounding
of its own worth speaking of; callers compare with a tolerance per output dtype.
"""
import torch
import torch.nn.functional as F

import moekit
from moekit import Activation, GateUpLayout, GroupMask, GroupScore, ScoreFunc, SoftmaxOrder


def _enum(cls, v):
    return moekit._config.enum_value(cls, v, "reference", cls.__name__)


# ---- router --------------------------------------------------------------------------------------

def _scores(zd, cfg):
    score = _enum(ScoreFunc, cfg.score_func)
    if score == ScoreFunc.SOFTMAX:
        return torch.softmax(zd, -1)
    if score == ScoreFunc.SIGMOID:
        return torch.sigmoid(zd)
    return torch.sqrt(F.softplus(zd))


def _topk_then_softmax(cfg):
    return (_enum(ScoreFunc, cfg.score_func) == ScoreFunc.SOFTMAX and
            _enum(SoftmaxOrder, cfg.softmax_order) == SoftmaxOrder.TOPK_THEN_SOFTMAX)


def router_select(z, cfg, bias=None, margin=1e-5):
    """The router's selection: (indices [T, K] int64, clear [T] bool). A row is clear when every
    boundary the selection crosses (the K-th and (K+1)-th candidate, the G'-th and (G'+1)-th group)
    is wider than margin, so an fp32 implementation must agree with this float64 one there."""
    T, E = z.shape
    K, G = cfg.top_k, cfg.num_groups
    zd = z.double()
    b = torch.zeros(E, dtype=torch.float64, device=z.device) if bias is None else bias.double()
    sel = (zd + b) if _topk_then_softmax(cfg) else _scores(zd, cfg) + b
    clear = torch.ones(T, dtype=torch.bool, device=z.device)
    if G > 1:
        gs = sel.view(T, G, E // G)
        mode = _enum(GroupScore, cfg.group_score)
        if mode == GroupScore.AUTO:
            mode = GroupScore.TOP2_SUM if bias is not None else GroupScore.MAX
        if mode == GroupScore.MAX:
            group_score = gs.max(-1).values
        else:
            n = 2 if mode == GroupScore.TOP2_SUM else cfg.group_score_topn
            group_score = gs.topk(n, -1).values.sum(-1)
        ranked = group_score.sort(-1, descending=True).values
        Gk = cfg.num_groups_kept
        if Gk < G:
            clear &= (ranked[:, Gk - 1] - ranked[:, Gk]) > margin
        kept = group_score.topk(Gk, -1).indices
        keep = torch.zeros(T, G, dtype=torch.bool, device=z.device)
        keep.scatter_(1, kept, True)
        fill = 0.0 if _enum(GroupMask, cfg.group_mask) == GroupMask.ZERO else float("-inf")
        sel = sel.masked_fill(~keep.repeat_interleave(E // G, 1), fill)
    ranked = sel.sort(-1, descending=True).values
    if K < E:
        gap = ranked[:, K - 1] - ranked[:, K]
        clear &= torch.nan_to_num(gap, nan=0.0, posinf=1.0) > margin
    # Ties inside the top K decide the order of the indices: require them apart too.
    if K > 1:
        clear &= ((ranked[:, :K - 1] - ranked[:, 1:K]) > margin).all(-1)
    return sel.topk(K, -1).indices, clear


def router(z, cfg, idx, bias=None):
    """(weights [T, K] float64, p [T, E] the aux-loss scores), both differentiable in z, for the
    selection idx (moekit's own, so the comparison does not hinge on near-ties)."""
    zd = z.double()
    s = _scores(zd, cfg)
    c = s if bias is None else s + bias.double()
    idx = idx.long()
    if _topk_then_softmax(cfg):
        w = torch.softmax(zd.gather(1, idx), -1)
    else:
        w = (c if cfg.weights_use_bias else s).gather(1, idx)
    if _enum(ScoreFunc, cfg.score_func) == ScoreFunc.SOFTMAX:
        p = torch.softmax(zd, -1)
    else:
        p = c if cfg.weights_use_bias else s
    if cfg.normalize and cfg.top_k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
        p = p / (p.sum(-1, keepdim=True) + 1e-20)
    return w * cfg.route_scale, p


def router_stats(idx, p, E, mask=None):
    """(load [E] int64, S [E] float64 differentiable in p, N) as the router's statistics."""
    T = idx.shape[0]
    m = torch.ones(T, dtype=torch.float64, device=idx.device) if mask is None else mask.double()
    load = torch.zeros(E, dtype=torch.int64, device=idx.device)
    load.index_add_(0, idx.reshape(-1), m.repeat_interleave(idx.shape[1]).long())
    return load, (p * m[:, None]).sum(0), int(m.sum().item())


def aux_loss(load, S, N, E, K):
    """NeMo's aux loss; the gradient flows through S only (f is a constant)."""
    n = max(N, 1)
    f = load.double() * E / (K * n)
    return (f * (S / n)).sum()


# ---- tokens --------------------------------------------------------------------------------------

def plan(idx, cfg, T, mask=None):
    """The plan on the host: dict of counts, offsets, row_of_slot, slot_of_row (first `total`
    entries), total, as Python lists (dropless; alignment A; local range)."""
    K = cfg.top_k
    e0 = cfg.local_expert_begin
    el = cfg.num_local_experts or (cfg.num_experts - e0)
    A = cfg.alignment
    ids = idx.reshape(-1).tolist()
    m = [1] * T if mask is None else [int(v != 0) for v in mask.tolist()]
    per = [[] for _ in range(el)]
    for s, e in enumerate(ids):
        if m[s // K] and e0 <= e < e0 + el:
            per[e - e0].append(s)
    counts, offsets, row_of_slot, slot_of_row = [], [0], [-1] * (T * K), []
    for e in range(el):
        counts.append(len(per[e]))
        for s in per[e]:
            row_of_slot[s] = len(slot_of_row)
            slot_of_row.append(s)
        size = -(-len(per[e]) // A) * A
        slot_of_row += [-1] * (size - len(per[e]))
        offsets.append(offsets[-1] + size)
    return dict(counts=counts, offsets=offsets, row_of_slot=row_of_slot, slot_of_row=slot_of_row, total=offsets[-1])


def permute(x, ref_plan, R, K):
    """xp [R, H] (rows past total zero) as a differentiable gather."""
    sor = torch.tensor(ref_plan["slot_of_row"], device=x.device, dtype=torch.int64)
    tok = torch.where(sor >= 0, sor // K, torch.zeros_like(sor))
    rows = x.index_select(0, tok) * (sor >= 0)[:, None].to(x.dtype)
    out = torch.zeros((R, x.shape[1]), dtype=x.dtype, device=x.device)
    return torch.cat([rows, out[rows.shape[0]:]], 0)


def combine(yp, ref_plan, w, T, K):
    """y [T, H] = sum_k w[t, k] yp[row(t, k)] (unweighted when w is None), differentiable."""
    ros = torch.tensor(ref_plan["row_of_slot"], device=yp.device, dtype=torch.int64).view(T, K)
    y = torch.zeros((T, yp.shape[1]), dtype=yp.dtype, device=yp.device)
    for k in range(K):
        has = ros[:, k] >= 0
        rows = yp.index_select(0, ros[:, k].clamp(min=0)) * has[:, None].to(yp.dtype)
        y = y + (rows if w is None else w[:, k:k + 1].to(yp.dtype) * rows)
    return y


# ---- experts -------------------------------------------------------------------------------------

def activation(u, act, layout, alpha, limit):
    act = _enum(Activation, act)
    if act == Activation.RELU2:
        return torch.relu(u) ** 2
    layout = _enum(GateUpLayout, layout)
    interleaved = layout == GateUpLayout.INTERLEAVED or (layout == GateUpLayout.AUTO and
                                                         act == Activation.QUICK_GEGLU)
    if interleaved:
        g, v = u[..., 0::2], u[..., 1::2]
    else:
        g, v = u.chunk(2, -1)
    clamp = limit > 0 and act in (Activation.SWIGLU, Activation.QUICK_GEGLU, Activation.SWIGLU_OAI)
    if clamp:
        g = g.clamp(max=limit)
        v = v.clamp(-limit, limit)
    if act == Activation.SWIGLU:
        return F.silu(g) * v
    if act == Activation.GEGLU:
        return F.gelu(g, approximate="tanh") * v
    return g * torch.sigmoid(alpha * g) * (v + 1)


def experts(xp, offsets, wgu, wd, cfg, p=None, bgu=None, bd=None):
    """The grouped expert FFN over segments offsets (host list), float64, differentiable."""
    R, H = xp.shape
    out = []
    for e in range(len(offsets) - 1):
        a0, a1 = offsets[e], offsets[e + 1]
        x = xp[a0:a1]
        u = x @ wgu[e] + (0 if bgu is None else bgu[e])
        a = activation(u, cfg.activation, cfg.gate_up_layout, cfg.act_alpha, cfg.act_limit)
        pr = torch.ones((a1 - a0, 1), dtype=xp.dtype, device=xp.device) if p is None else p[a0:a1, None]
        b = 0 if bd is None else bd[e]
        if cfg.weight_after_down:
            out.append(pr * (a @ wd[e] + b))
        else:
            out.append((a * pr) @ wd[e] + pr * b)
    out.append(torch.zeros((R - offsets[-1], H), dtype=xp.dtype, device=xp.device))
    return torch.cat(out, 0)


def mlp(x, wgu, wd, cfg, bgu=None, bd=None):
    """The dense MLP, float64, differentiable; weights in cfg.weight_layout."""
    out_in = moekit._config.enum_value(moekit.WeightLayout, cfg.weight_layout, "ref", "weight_layout") == 1
    u = x @ (wgu.t() if out_in else wgu) + (0 if bgu is None else bgu)
    a = activation(u, cfg.activation, cfg.gate_up_layout, cfg.act_alpha, cfg.act_limit)
    return a @ (wd.t() if out_in else wd) + (0 if bd is None else bd)
