"""Host-side tests: no torch, no GPU. The library validates every argument before it touches the
device, so configs, size queries and the error paths of the entry points run here through ctypes,
with device arrays that are fake addresses (DeviceArray.wrap) which no call may dereference."""
import ctypes
import threading

import pytest

import moekit
from moekit import _capi, _lib, _tensor
from moekit import DeviceArray as D

# Fake device addresses, far apart and 256-byte aligned: validation reads none of them.
_next = [0x7f1000000000]


def fake(shape, kind, offset=0):
    """A fake device array at a fresh address (+offset bytes)."""
    addr = _next[0]
    _next[0] += 1 << 24
    return D.wrap(addr + offset, shape, kind)


@pytest.fixture(autouse=True)
def _needs_lib(lib):
    return lib


# ---- library, version, statuses --------------------------------------------------------------

def test_version_matches_the_headers():
    assert moekit.version() == (_capi.MOEKIT_VERSION_MAJOR, _capi.MOEKIT_VERSION_MINOR, _capi.MOEKIT_VERSION_PATCH)
    assert _lib.fn("moekit_get_version")() == moekit.HEADER_VERSION
    assert moekit.__version__ == "%d.%d.%d" % moekit.version()


def test_status_strings():
    seen = set()
    for name in dir(_capi):
        if name.startswith("MOEKIT_STATUS_"):
            s = moekit.status_string(getattr(_capi, name))
            assert s and s != "unknown moekit status", name
            seen.add(s)
    assert len(seen) == 11  # distinct text per status
    assert moekit.status_string(9999) == "unknown moekit status"


def test_error_carries_the_librarys_message():
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.RouterConfig(num_experts=32, top_k=40).check()
    err = e.value
    assert isinstance(err, ValueError) and isinstance(err, moekit.MoekitError)
    assert err.status == _capi.MOEKIT_STATUS_INVALID_ARGUMENT
    assert err.message == "moekit_router_config_check: config->top_k = 40 is outside [1, 32]"
    assert "invalid_argument" in str(err)
    # A later successful call clears the thread's message.
    moekit.RouterConfig(num_experts=32, top_k=4).check()
    assert moekit.last_error() == ""


def test_last_error_is_per_thread():
    with pytest.raises(moekit.InvalidArgumentError):
        moekit.PlanConfig(num_experts=8, top_k=2, alignment=0).check()
    here = moekit.last_error()
    other = []
    t = threading.Thread(target=lambda: other.append(moekit.last_error()))
    t.start()
    t.join()
    assert "alignment = 0" in here
    assert other == [""]


@pytest.mark.parametrize("make,text", [
    (lambda: moekit.PlanConfig(num_experts=8, top_k=2, alignment=0), "moekit_plan_config_check: config->alignment = 0"),
    (lambda: moekit.ExpertsConfig(num_experts=8, hidden=12, inter=16), "config->hidden = 12 is not a multiple of 8"),
    (lambda: moekit.ExpertsConfig(num_experts=8, hidden=16, inter=16, dtype=5), "config->dtype = 5"),
    (lambda: moekit.MlpConfig(hidden=16, inter=16, activation=9), "moekit_mlp_config_check: config->activation = 9"),
    (lambda: moekit.EpConfig(num_ranks=0), "moekit_ep_config_check: config->num_ranks = 0"),
    (lambda: moekit.RouterConfig(num_experts=64, top_k=4, score_func=7), "config->score_func = 7"),
    (lambda: moekit.RouterConfig(num_experts=64, top_k=4, num_groups=3), "num_groups = 3 does not divide"),
], ids=["plan", "experts-hidden", "experts-dtype", "mlp", "ep", "router-score", "router-groups"])
def test_bad_configs_name_the_field(make, text):
    with pytest.raises(moekit.InvalidArgumentError) as e:
        make().check()
    assert text in e.value.message


def test_enum_fields_take_names_members_and_ints():
    a = moekit.RouterConfig(num_experts=64, top_k=4, score_func="Sigmoid", group_mask="neg-inf").to_c()
    b = moekit.RouterConfig(num_experts=64, top_k=4, score_func=moekit.ScoreFunc.SIGMOID,
                            group_mask=_capi.MOEKIT_GROUP_MASK_NEG_INF).to_c()
    assert (a.score_func, a.group_mask) == (b.score_func, b.group_mask) == (1, 1)
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.RouterConfig(num_experts=64, top_k=4, score_func="tanh").to_c()
    assert "score_func = 'tanh' is not one of softmax, sigmoid, sqrt_softplus" in e.value.message
    assert moekit.ExpertsConfig(num_experts=1, hidden=8, inter=8, dtype="float16").to_c().dtype == _capi.MOEKIT_DTYPE_F16
    assert moekit.MlpConfig(hidden=8, inter=8, weight_layout="out_in").to_c().weight_layout == _capi.MOEKIT_WEIGHT_OUT_IN


def test_presets_are_the_model_table():
    for name in moekit.ROUTER_PRESETS:
        moekit.RouterConfig.preset(name).check()
    ds = moekit.RouterConfig.preset("DeepSeek-V3")
    assert (ds.num_experts, ds.top_k, ds.num_groups, ds.num_groups_kept, ds.route_scale) == (256, 8, 8, 4, 2.5)
    assert ds.score_func == moekit.ScoreFunc.SIGMOID and ds.normalize
    assert moekit.preset_uses_correction_bias("deepseek_v3") and not moekit.preset_uses_correction_bias("qwen3")
    gpt = moekit.RouterConfig.preset("gpt-oss", num_experts=32)
    assert gpt.num_experts == 32 and gpt.softmax_order == moekit.SoftmaxOrder.TOPK_THEN_SOFTMAX
    assert moekit.RouterConfig.preset("glm-4.5").num_experts == 160
    assert set(moekit.ROUTER_PRESETS) == {"deepseek_v3", "qwen3", "gpt_oss", "mixtral", "glm45", "nemotron", "moonlight"}
    with pytest.raises(moekit.InvalidArgumentError):
        moekit.RouterConfig.preset("llama")


# ---- size queries ----------------------------------------------------------------------------

def test_router_workspace_sizes():
    cfg = moekit.RouterConfig.preset("qwen3")
    assert cfg.forward_workspace_size(0) >= 0
    sizes = [cfg.forward_workspace_size(t) for t in (1, 1000, 100000)]
    assert sizes == sorted(sizes)
    with pytest.raises(moekit.InvalidArgumentError) as e:
        cfg.backward_workspace_size(-1)
    assert e.value.message == "moekit_router_backward_workspace_size: num_tokens = -1 is negative"


def _dropless_rows(N, e_local, A):
    return N + min(e_local, N) * (A - 1)


@pytest.mark.parametrize("E,K,T,A,C,e0,el", [(8, 2, 10, 1, 0, 0, 0), (8, 2, 10, 4, 0, 0, 0), (257, 7, 13, 16, 0, 0, 0),
                                            (64, 6, 1000, 8, 0, 16, 16), (16, 4, 100, 4, 9, 0, 0), (16, 4, 0, 8, 0, 0, 0)])
def test_plan_max_rows_is_the_documented_worst_case(E, K, T, A, C, e0, el):
    cfg = moekit.PlanConfig(num_experts=E, top_k=K, alignment=A, capacity=C, local_expert_begin=e0,
                            num_local_experts=el)
    N, e_local = T * K, cfg.local_experts
    want = _dropless_rows(N, e_local, A)
    if C:
        roundup = -(-C // A) * A
        want = min(want, min(N, e_local * C) + min(e_local, N) * (A - 1), e_local * roundup)
    assert cfg.max_rows(T) == want


def test_plan_arrays_are_carved_from_the_buffer():
    cfg = moekit.PlanConfig(num_experts=12, top_k=3, alignment=8)
    T = 37
    size = cfg.buffer_size(T)
    buf = fake((size,), "u8")
    plan = moekit.plan_alloc(cfg, T, buffer=buf)
    assert plan.max_rows == cfg.max_rows(T) and plan.num_local_experts == 12
    counts = dict(expert_counts=12, expert_offsets=13, row_of_slot=T * 3, slot_of_row=plan.max_rows, totals=3)
    spans = []
    for name, n in counts.items():
        a = getattr(plan, name)
        assert a.shape == (n,) and a.kind == "i32"
        assert a.ptr % 256 == 0 and buf.ptr <= a.ptr and a.ptr + 4 * n <= buf.ptr + size, name
        spans.append((a.ptr, a.ptr + 4 * n))
    spans.sort()
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.plan_alloc(cfg, T, buffer=fake((size - 1,), "u8"))
    assert "buffer has %d bytes; the plan needs %d" % (size - 1, size) in e.value.message


def test_experts_and_mlp_workspace_sizes():
    e = moekit.ExpertsConfig(num_experts=8, hidden=64, inter=32)
    assert e.nu == 64 and e.replace(activation="relu2").nu == 32
    assert e.forward_workspace_size(0) >= 0 and e.backward_workspace_size(1024) >= e.backward_workspace_size(0)
    assert e.backward_workspace_size(1024, has_saved_u=False) >= e.backward_workspace_size(1024)
    m = moekit.MlpConfig(hidden=64, inter=32)
    assert m.forward_workspace_size(128) >= 0 and m.backward_workspace_size(128) >= 0
    with pytest.raises(moekit.InvalidArgumentError):
        e.forward_workspace_size(-1)


def test_ep_host_queries():
    cfg = moekit.EpConfig(num_ranks=2, num_experts=8, top_k=2, hidden=64, max_tokens=16)
    nbytes, count = cfg.layout_size()
    assert nbytes > 0 and count > 0
    assert cfg.max_recv_rows() == 2 * 16
    assert cfg.workspace_size() > 0
    cap = cfg.replace(mode="capacity", capacity=8)
    assert cap.layout_size()[1] == 0
    try:
        v = moekit.nccl_version()
        assert v >= 20000
    except moekit.NotAvailableError as e:
        assert "moekit_ep_nccl_version" in e.message


# ---- entry points: argument checks before any device access ----------------------------------

def _router_args(T=4, E=32, K=4):
    return dict(logits=fake((T, E), "f32"), weights=fake((T, K), "f32"), indices=fake((T, K), "i32"),
                workspace=fake((1 << 20,), "u8"))


def test_router_forward_checks_shapes_in_python():
    cfg = moekit.RouterConfig(num_experts=32, top_k=4)
    a = _router_args()
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.router_forward(a["logits"], cfg, weights=fake((4, 5), "f32"), indices=a["indices"], return_load=False,
                              workspace=a["workspace"])
    assert e.value.message == "moekit.router_forward: weights has shape (4, 5); expected (4, 4)"
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.router_forward(fake((4, 32), "i32"), cfg, weights=a["weights"], indices=a["indices"])
    assert "logits has element type i32; expected f32 or f16 or bf16" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.router_forward(fake((4, 16), "f32"), cfg)
    assert "logits has 16 columns; config.num_experts = 32" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.router_forward(a["logits"], cfg, token_mask=fake((5,), "u8"))
    assert "token_mask has shape (5,)" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.router_forward(a["logits"], cfg)  # raw arrays: nothing to allocate outputs from
    assert "pass every output buffer explicitly" in e.value.message


def test_router_forward_library_checks():
    cfg = moekit.RouterConfig(num_experts=32, top_k=4)
    a = _router_args()
    base = a["weights"].ptr
    overlapping = D.wrap(base + 16, (4, 4), "i32")
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.router_forward(a["logits"], cfg, weights=a["weights"], indices=overlapping, return_load=False,
                              workspace=a["workspace"])
    assert e.value.message.startswith("moekit_router_forward: weights = 0x") and "overlaps indices" in e.value.message
    with pytest.raises(moekit.MisalignedError) as e:
        moekit.router_forward(a["logits"], cfg, weights=fake((4, 4), "f32", offset=2), indices=a["indices"],
                              return_load=False, workspace=a["workspace"])
    assert "weights = 0x" in e.value.message and "not aligned" in e.value.message
    need = cfg.forward_workspace_size(4)
    if need:
        with pytest.raises(moekit.WorkspaceTooSmallError) as e:
            moekit.router_forward(a["logits"], cfg, weights=a["weights"], indices=a["indices"], return_load=False,
                                  workspace=fake((need - 1,), "u8"))
        assert e.value.message.startswith("moekit_router_forward:")
    with pytest.raises(moekit.MisalignedError):
        moekit.router_forward(a["logits"], cfg, weights=a["weights"], indices=a["indices"], return_load=False,
                              workspace=fake((1 << 20,), "u8", offset=8))


def test_router_backward_and_small_entry_points_check_arguments():
    cfg = moekit.RouterConfig(num_experts=32, top_k=4)
    a = _router_args()
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.router_backward(a["logits"], fake((4, 3), "i32"), cfg, grad_logits=fake((4, 32), "f32"))
    assert "indices has shape (4, 3); expected (4, 4)" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.aux_loss(fake((32,), "i32"), fake((32,), "f32"), fake((1,), "i32"), 40, out=fake((1,), "f32"))
    assert e.value.message == "moekit_aux_loss_forward: top_k = 40 is outside [1, 32]"
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.bias_update(fake((32,), "f32"), fake((16,), "i32"), 1e-3)
    assert "expert_load has shape (16,); expected (32)" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.fake_gate(4, 8, 9, weights=fake((4, 9), "f32"), indices=fake((4, 9), "i32"), return_load=False)
    assert e.value.message.startswith("moekit_fake_gate_forward: top_k = 9")


def test_tokens_entry_points_check_arguments():
    cfg = moekit.PlanConfig(num_experts=8, top_k=2)
    T, H = 10, 64
    plan = moekit.plan_alloc(cfg, T, buffer=fake((cfg.buffer_size(T),), "u8"))
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.plan_build(fake((T, 3), "i32"), cfg)
    assert "indices has 3 columns; config.top_k = 2" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.plan_build(fake((T + 1, 2), "i32"), cfg, plan=plan, workspace=fake((1 << 16,), "u8"))
    assert "plan was made for 10 tokens; indices has 11" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.permute(fake((T + 1, H), "bf16"), plan, out=fake((plan.max_rows, H), "bf16"))
    assert "x has 11 rows; the plan was built for 10 tokens" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.permute(fake((T, H), "bf16"), plan, out=fake((plan.max_rows, H), "f16"))
    assert "out has element type f16; expected bf16" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:  # the library: an H it rejects
        moekit.permute(fake((T, 0), "bf16"), plan, out=fake((plan.max_rows, 0), "bf16"))
    assert e.value.message.startswith("moekit_tokens_permute:") and "hidden" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.combine(fake((plan.max_rows + 1, H), "f32"), plan, out=fake((T, H), "f32"))
    assert "yp has %d rows; the plan's max_rows is %d" % (plan.max_rows + 1, plan.max_rows) in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.combine_backward(fake((T, H), "f32"), plan, need_grad_yp=False, need_grad_weights=True)
    assert "grad_weights needs yp" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.permute_backward(fake((plan.max_rows, H), "f32"), plan, grad_x=fake((T, H), "f32"),
                                grad_weights=fake((T, 2), "f32"))
    assert "grad_weights is given without grad_row_weights" in e.value.message


def _experts_args(E=4, H=64, I=32, R=40, kind="bf16"):
    return dict(xp=fake((R, H), kind), expert_offsets=fake((E + 1,), "i32"), w_gate_up=fake((E, H, 2 * I), kind),
                w_down=fake((E, I, H), kind))


def test_experts_entry_points_check_arguments():
    a = _experts_args()
    ws = fake((1 << 24,), "u8")
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.experts_forward(a["xp"], a["expert_offsets"], a["w_gate_up"], fake((4, 32, 48), "bf16"),
                               out=fake((40, 64), "bf16"), save_u=False, workspace=ws)
    assert "w_down has shape (4, 32, 48); expected (4, 32, 64)" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:  # relu2 wants NU = I columns
        moekit.experts_forward(a["xp"], a["expert_offsets"], a["w_gate_up"], a["w_down"], activation="relu2",
                               out=fake((40, 64), "bf16"), save_u=False, workspace=ws)
    assert "w_gate_up has shape (4, 64, 64); expected (4, 64, 32)" in e.value.message
    with pytest.raises(moekit.MisalignedError) as e:  # tensors need 16-byte alignment
        moekit.experts_forward(fake((40, 64), "bf16", offset=8), a["expert_offsets"], a["w_gate_up"], a["w_down"],
                               out=fake((40, 64), "bf16"), save_u=False, workspace=ws)
    assert e.value.message.startswith("moekit_experts_forward:") and "xp" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.experts_backward(fake((40, 64), "bf16"), a["xp"], a["expert_offsets"], a["w_gate_up"], a["w_down"],
                                needs=["row_weights"], workspace=ws)
    assert "grad_row_weights is asked for but row_weights is not given" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.experts_backward(fake((40, 64), "bf16"), a["xp"], a["expert_offsets"], a["w_gate_up"], a["w_down"],
                                needs=["wgu"], workspace=ws)
    assert "needs = ['wgu'] names unknown gradients" in e.value.message


def test_mlp_entry_points_check_arguments():
    # A NULL handle is the library's first check (no cuBLASLt state needed to reject it).
    cfg = moekit.MlpConfig(hidden=64, inter=32).to_c()
    with pytest.raises(moekit.InvalidArgumentError) as e:
        _lib.call("moekit_mlp_forward", None, ctypes.byref(cfg), 4, None, None, None, None, None, None, None, None, 0,
                  None)
    assert e.value.message == "moekit_mlp_forward: handle is NULL"
    with pytest.raises(moekit.InvalidArgumentError) as e:  # Python's shape check runs before the handle is made
        moekit.mlp_forward(fake((4, 64), "bf16"), fake((64, 64), "bf16"), fake((32, 48), "bf16"),
                           out=fake((4, 64), "bf16"), save_u=False)
    assert "w_down has shape (32, 48); expected (32, 64)" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:  # nn.Linear layout: W_gu [NU, H], W_down [H, I]
        moekit.mlp_forward(fake((4, 64), "bf16"), fake((64, 64), "bf16"), fake((64, 48), "bf16"),
                           weight_layout="out_in", out=fake((4, 64), "bf16"), save_u=False)
    assert "w_gate_up has shape (64, 64); expected (96, 64)" in e.value.message


# ---- array adaptation ------------------------------------------------------------------------

class FakeCai(object):
    def __init__(self, shape, typestr, strides=None, readonly=False, mask=None, ptr=0x7f2000000000):
        self.__cuda_array_interface__ = dict(shape=shape, typestr=typestr, strides=strides, data=(ptr, readonly),
                                             version=3, mask=mask)


def test_cuda_array_interface_adaptation():
    c = _tensor.Call("t")
    a = c.input(FakeCai((4, 8), "<f4"), "x", ndim=2)
    assert (a.kind, a.shape, a.strides, a.ptr, a.framework) == ("f32", (4, 8), (8, 1), 0x7f2000000000, None)
    b = c.input(FakeCai((4, 8), "<f2", strides=(32, 2)), "x", contiguous="rows")
    assert b.kind == "f16" and b.strides == (16, 1) and b.row_stride() == 16 and not b.is_contiguous()
    assert c.input(FakeCai((4,), "|b1"), "mask").kind == "u8"
    with pytest.raises(moekit.InvalidArgumentError) as e:
        c.input(FakeCai((4, 8), "<f8"), "x")
    assert "x has typestr '<f8'" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        c.input(FakeCai((4, 8), "<f4", strides=(32, 8)), "x")
    assert "x must be contiguous" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        c.input(FakeCai((4, 8), "<f4", strides=(32, 6)), "x")
    assert "not multiples of its 4-byte elements" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError):
        c.input(FakeCai((4,), "<f4", mask=object()), "x")
    with pytest.raises(moekit.InvalidArgumentError) as e:
        c.output(FakeCai((4, 8), "<f4", readonly=True), "out", "f32", (4, 8))
    assert "out is read-only" in e.value.message
    with pytest.raises(moekit.InvalidArgumentError) as e:
        c.input([1, 2, 3], "x")
    assert "expected a CUDA array" in e.value.message


def test_stream_handles():
    class TorchLike(object):
        cuda_stream = 0x1234

    class CupyLike(object):
        ptr = 0x5678

    assert _tensor.stream_handle(TorchLike()) == 0x1234
    assert _tensor.stream_handle(CupyLike()) == 0x5678
    assert _tensor.stream_handle(42) == 42
    assert _tensor.Call("t", stream=7).stream_arg.value == 7
    assert _tensor.Call("t").stream_arg.value is None  # legacy default stream


def test_arrays_on_different_devices_are_rejected():
    with pytest.raises(moekit.InvalidArgumentError) as e:
        _tensor.Call("moekit.x", None, [D.wrap(0x1000, (4,), "f32", device=0), D.wrap(0x2000, (4,), "f32", device=1)])
    assert e.value.message == "moekit.x: arguments are on different CUDA devices (0 and 1)"


# ---- the layer (host side: configs, sizes, the saved buffer's layout) -------------------------

def _layer_config(**kw):
    return moekit.LayerConfig.from_sizes(moekit.RouterConfig.preset("qwen3"), 256, 64, **kw)


def test_layer_configs_for_every_router_preset():
    for name in moekit.ROUTER_PRESETS:
        cfg = moekit.LayerConfig.from_sizes(moekit.RouterConfig.preset(name), 512, 128, shared_inter=256)
        cfg.check()
        assert cfg.experts.num_experts == cfg.router.num_experts and cfg.shared.hidden == 512


_NOT_A_HANDLE = ctypes.create_string_buffer(256)


@pytest.mark.parametrize("change,cls,text", [
    (dict(experts=moekit.ExpertsConfig(num_experts=64, hidden=256, inter=64)), moekit.InvalidArgumentError,
     "config->experts->num_experts = 64 differs from config->router->num_experts = 128"),
    (dict(router=moekit.RouterConfig.preset("qwen3", top_k=40)), moekit.InvalidArgumentError,
     "config->router->top_k = 40 is outside [1, 32]"),
    (dict(shared_gate=True), moekit.InvalidArgumentError, "config->shared_gate = 1 but config->shared is NULL"),
    # not an EP handle (readable memory: a dangling handle pointer is undefined, as in every C API)
    (dict(expert_parallel=ctypes.addressof(_NOT_A_HANDLE)), moekit.InvalidArgumentError,
     "is not a live moekit_ep_handle_t"),
    (dict(hidden=260), moekit.InvalidArgumentError, "config->hidden = 260 is not a multiple of 8"),
], ids=["experts-E", "router-K", "gate-without-shared", "expert-parallel", "hidden"])
def test_bad_layer_configs_name_the_path(change, cls, text):
    with pytest.raises(cls) as e:
        _layer_config().replace(**change).check()
    assert e.value.message.startswith("moekit_layer_config_check: ") and text in e.value.message


@pytest.mark.parametrize("kw", [dict(), dict(shared_inter=128, shared_gate=True), dict(recompute=True, shared_inter=64),
                                dict(router_fp32=True, alignment=8)], ids=["plain", "gated-shared", "recompute", "fp32"])
def test_layer_saved_buffer_layout(kw):
    cfg = _layer_config(**kw)
    T = 100
    size = cfg.saved_size(T)
    assert cfg.saved_size(2 * T) > size and cfg.saved_size(0) >= 0
    fwd, bwd = cfg.workspace_size(T)
    assert fwd >= 0 and bwd >= 0
    buf = fake((size,), "u8")
    v = cfg.saved_view(T, buf)
    assert v.max_rows == moekit.PlanConfig(num_experts=128, top_k=8, alignment=cfg.alignment).max_rows(T)
    assert v.logits_row_stride == 128
    assert v.logits.kind == ("f32" if cfg.router_fp32 else "bf16")
    assert v.weights.shape == (T, 8) and v.indices.shape == (T, 8) and v.slot_of_row.shape == (v.max_rows,)
    assert (v.expert_u is None) == bool(cfg.recompute)
    assert (v.expert_xp is None) == bool(cfg.recompute) and (v.expert_row_weights is None) == bool(cfg.recompute)
    if v.expert_xp is not None:
        assert v.expert_xp.shape == (v.max_rows, cfg.hidden) and v.expert_row_weights.shape == (v.max_rows,)
    assert (v.shared_u is None) == (cfg.shared is None or bool(cfg.recompute))
    assert (v.shared_out is None) == (not cfg.shared_gate)
    spans = []
    for name, a in v._asdict().items():
        if isinstance(a, moekit.DeviceArray):
            assert a.ptr % 256 == 0 and buf.ptr <= a.ptr and a.ptr + a.nbytes <= buf.ptr + size, name
            spans.append((a.ptr, a.ptr + a.nbytes))
    spans.sort()
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    # layer.h says INVALID_ARGUMENT for a short buffer, the library returns WORKSPACE_TOO_SMALL
    # (as the forward does for the same buffer): either is a clear refusal naming saved_bytes.
    with pytest.raises((moekit.InvalidArgumentError, moekit.WorkspaceTooSmallError)) as e:
        cfg.saved_view(T, fake((size - 1,), "u8"))
    assert e.value.message.startswith("moekit_layer_saved_view: saved_bytes = %d" % (size - 1))


def test_layer_entry_points_reject_a_null_layer():
    with pytest.raises(moekit.InvalidArgumentError) as e:
        _lib.call("moekit_layer_forward", None, 4, None, None, None, None, None, None, None, 0, None, 0, None)
    assert e.value.message == "moekit_layer_forward: layer is NULL"
    with pytest.raises(moekit.InvalidArgumentError) as e:
        _lib.call("moekit_layer_backward", None, 4, None, None, None, None, 0, None, 0.0, None, None, None, 0, None)
    assert e.value.message == "moekit_layer_backward: layer is NULL"
    assert moekit.LAYER_PARAM_NAMES[0] == "router_weight" and "correction_bias" not in moekit.LAYER_GRAD_NAMES
    assert [f[0] for f in _capi.LayerParamsStruct._fields_[1:]] == list(moekit.LAYER_PARAM_NAMES)
    assert [f[0] for f in _capi.LayerGradsStruct._fields_[1:]] == list(moekit.LAYER_GRAD_NAMES)
