"""Expert parallelism through the binding on a one-rank NCCL communicator (CuPy's NcclCommunicator):
every token goes to rank 0 itself, so dispatch must return the tokens, ids and weights as given,
combine must return the partial rows, and the backwards the gradients, exactly. The multi-GPU
semantics are the C suite's (tests/ep); this checks the binding's argument plumbing."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the GPU tests compare against PyTorch)")

import moekit  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda")]


@pytest.fixture(scope="module")
def comm():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (it provides the NCCL communicator)")
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        pytest.skip("CuPy was built without NCCL: %s" % e)
    try:
        ours = moekit.nccl_version()
    except moekit.NotAvailableError:
        pytest.skip("libmoekit was built without NCCL")
    theirs = nccl.get_version()
    if theirs != ours:
        pytest.skip("CuPy's NCCL (%d) is not moekit's (%d): a communicator cannot cross libraries" % (theirs, ours))
    with cupy.cuda.Device(torch.cuda.current_device()):
        c = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    yield c
    c.destroy()


@pytest.mark.parametrize("mode", ["exact", "capacity"])
def test_one_rank_dispatch_combine_round_trip(comm, mode):
    T, E, K, H = 40, 8, 2, 64
    cfg = moekit.EpConfig(num_ranks=1, num_experts=E, top_k=K, hidden=H, max_tokens=T, dtype="bf16", mode=mode,
                          capacity=T if mode == "capacity" else 0)
    gen = torch.Generator().manual_seed(71)
    idx = torch.argsort(torch.rand(T, E, generator=gen), dim=1)[:, :K].to(torch.int32).cuda()
    w = torch.rand(T, K, generator=gen).cuda()
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
    with moekit.EP(cfg, comm.comm) as ep:
        layout = ep.layout(idx)
        assert layout.num_recv_rows == T
        if mode == "exact":
            assert ep.layout_counts(layout) == ([T], [T])
        assert int(layout.dropped.item()) == 0
        recv = ep.dispatch(x, idx, w, layout)
        assert torch.equal(recv.x, x) and torch.equal(recv.indices, idx) and torch.equal(recv.weights, w)
        assert torch.equal(recv.src_token, torch.arange(T, dtype=torch.int32, device="cuda"))
        assert bool(recv.mask.all())
        partials = torch.randn(T, H, device="cuda").to(torch.bfloat16)
        assert torch.equal(ep.combine(partials, layout), partials)
        gx, gw = ep.dispatch_backward(partials, idx, layout, grad_recv_weights=w)
        assert torch.equal(gx, partials) and torch.equal(gw, w)
        assert torch.equal(ep.combine_backward(x, layout), x)
    load = torch.arange(E, dtype=torch.int32, device="cuda")
    moekit.allreduce_expert_load(comm.comm, load)
    s = torch.rand(E, device="cuda")
    n = torch.tensor([T], dtype=torch.int32, device="cuda")
    s0 = s.clone()
    moekit.allreduce_aux_stats(comm.comm, s, n)
    torch.cuda.synchronize()
    assert torch.equal(load, torch.arange(E, dtype=torch.int32, device="cuda"))
    assert torch.equal(s, s0) and int(n.item()) == T


def test_create_checks_the_communicator_size(comm):
    cfg = moekit.EpConfig(num_ranks=2, num_experts=8, top_k=2, hidden=64, max_tokens=8)
    with pytest.raises(moekit.InvalidArgumentError) as e:
        moekit.EP(cfg, comm.comm)
    assert "num_ranks" in e.value.message
