"""The block engine (:mod:`spice_ray.select.device_engine`): whole greedy steps on a torch device.

On CPU torch it must make the *same* picks as the numpy engines, with bit-identical traces (gains,
conflicts, scores) and a bit-identical selected-side state, whatever the block size, the number of
contender slots (overflows and rollbacks), an ω stop inside a block, ties, or a resume.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from test_select_engines import oracle, sketch_like, tie_problem

from spice_ray.select import SelectedState, device_engine, select
from spice_ray.select import factory as factory_mod
from spice_ray.select.device_engine import DeviceGreedy, margin_consts, pairwise_sum
from spice_ray.select.state import U64, rowdot

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread: a threaded (N×d)·(d×2) product is many times slower on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_run(a, b) -> None:
    assert a.indices.tolist() == b.indices.tolist()
    for key in ("gains", "conflicts", "scores", "logdets"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert a.stop_reason == b.stop_reason


def _with_engine(monkeypatch, **kw) -> None:
    """Make select() build its block engine with these settings (block size, contender slots)."""
    monkeypatch.setattr(factory_mod, "DeviceGreedy", functools.partial(DeviceGreedy, **kw))


# ------------------------------------------------------------------------------ canonical maths
def test_pairwise_sum_is_numpys_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for n in [*range(140), 200, 255, 256, 257, 300, 384, 512, 640, 1000, 1024]:
        for shape in ((n,), (3, n), (2, 4, n)):
            a = rng.normal(size=shape) * rng.lognormal(0.0, 3.0, size=shape)
            assert np.array_equal(pairwise_sum(torch.from_numpy(a)).numpy(), a.sum(axis=-1)), (n, shape)
    X, M = rng.normal(size=(5, 256)), rng.normal(size=(256, 256))
    want = rowdot(X[:, None, :], M[None, :, :])
    assert np.array_equal(pairwise_sum(torch.from_numpy(X)[:, None, :] * torch.from_numpy(M)[None]).numpy(), want)


@pytest.mark.parametrize("k", [6, 40])  # factored M⁻¹ (k < d), dense
def test_state_and_trace_are_the_host_states(k: int) -> None:
    G = sketch_like(1, n=300, d=16)
    eng = DeviceGreedy(G, alpha=0.7, lam=0.4, max_updates=k, device="cpu", block=7)
    st = SelectedState(16, k, alpha=0.7, lam=0.4)
    for w, replayed in eng.picks(k):
        ex = st.winner(G[[w.index]].astype(np.float64), np.array([w.index]))
        assert not replayed
        assert np.array_equal(w.u, ex.u) and np.array_equal(w.g, ex.g)
        assert (w.q, w.gain, w.conflict, w.score) == (ex.q, ex.gain, ex.conflict, ex.score)
        st.add(ex.u, ex.g, ex.q)
    assert np.array_equal(eng.s.numpy(), st.s) and float(np.sqrt(float(eng.ssq))) == st.s_norm
    if st.dense:
        assert np.array_equal(eng.minv.numpy(), st.minv)
    else:
        assert np.array_equal(eng.U[:k].numpy(), st.U) and np.array_equal(eng.c[:k].numpy(), st.c)


def test_margin_bounds_the_host_margin() -> None:
    G = sketch_like(2, n=200, d=12).astype(np.float64)
    max_ns = float((G * G).sum(1).max())
    for k in (5, 30):
        st = SelectedState(12, k, alpha=0.9, lam=0.6)
        for t in range(k):
            m0, kappa, c0 = margin_consts(12, t, 0.9, 0.6, max_ns)
            cm = min(2.0, kappa * st.A / st.s_norm + c0) if st.s_norm > 0 else 0.0
            assert m0 + 4 * 0.6 * cm >= st.margin(max_ns, U64)
            w = st.winner(G[[t]], np.array([t]))
            st.add(w.u, w.g, w.q)


# ------------------------------------------------------------------------- same picks as numpy
@pytest.mark.parametrize(
    "n,d,k,lam",
    [
        (3000, 16, 300, 0.3),
        (2000, 64, 200, 0.0),  # logdet
        (1200, 256, 120, 0.5),  # k < d: factored M⁻¹
        (2600, 256, 260, 0.2),  # dense at d = 256
        (900, 40, 90, 1.0),  # d not a power of two
    ],
)
def test_identical_to_numpy_eager(n: int, d: int, k: int, lam: float) -> None:
    G = sketch_like(n + d, n=n, d=d, dup=8, zeros=3)
    method = "logdet" if lam == 0 else "spice"
    want = select(G, k, method=method, lam=lam, lazy=False, device="numpy", diagnostics=False)
    got = select(G, k, method=method, lam=lam, lazy=False, device="cpu", diagnostics=False)
    _same_run(got, want)
    assert got.stats["engine"] == "device-block" and got.stats["blocks"] >= k // 32


def test_float64_sketches_and_k_equal_n() -> None:
    G = sketch_like(5, n=40, d=6).astype(np.float64)
    _same_run(select(G, 40, lam=0.7, lazy=False, device="cpu"), select(G, 40, lam=0.7, lazy=True))
    G = sketch_like(6, n=500, d=24).astype(np.float64)
    _same_run(select(G, 60, lam=0.2, alpha=0.3, device="cpu"), select(G, 60, lam=0.2, alpha=0.3))


@pytest.mark.parametrize("block", [1, 3, 32])
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_ties_with_few_contender_slots(monkeypatch, block: int, lam: float) -> None:
    """One contender slot: every exact tie overflows it → rollback, host decision, slots double."""
    _with_engine(monkeypatch, block=block, contenders=1)
    for seed in range(3):
        G = tie_problem(seed, n=40, d=5)
        sel = select(G, 16, lam=lam, lazy=False, device="cpu")
        assert sel.indices.tolist() == oracle(G, 16, alpha=1.0, lam=lam)
        _same_run(sel, select(G, 16, lam=lam, lazy=True))
    assert sel.stats["rollbacks"] > 0 and sel.stats["overflows"] > 0 and sel.stats["contenders"] > 1


def test_disagreement_is_rolled_back(monkeypatch) -> None:
    """If the device's own decision were wrong, the host check catches it and the run still matches."""
    calls = {"n": 0}
    real = DeviceGreedy._device_scores

    def contrary(self, q, dot, nn):  # every 3rd step: prefer the worst contender
        calls["n"] += 1
        score = real(self, q, dot, nn)
        return -score if calls["n"] % 3 == 0 else score

    def wide(*args):  # a loose margin: several valid contenders per step, so a wrong pick shows
        m0, kappa, c0 = margin_consts(*args)
        return m0 + 0.05, kappa, c0

    monkeypatch.setattr(DeviceGreedy, "_device_scores", contrary)
    monkeypatch.setattr(device_engine, "margin_consts", wide)
    _with_engine(monkeypatch, block=8, contenders=256)
    G = sketch_like(7, n=120, d=6, dup=20)
    sel = select(G, 40, lam=0.3, lazy=False, device="cpu")
    _same_run(sel, select(G, 40, lam=0.3, lazy=False, device="numpy"))
    assert sel.stats["rollbacks"] > 0 and sel.stats["overflows"] == 0


@pytest.mark.parametrize("block", [1, 6, 64])
def test_omega_stop_inside_a_block(monkeypatch, block: int) -> None:
    _with_engine(monkeypatch, block=block)
    G = sketch_like(8, n=800, d=10)
    want = select(G, 200, lam=0.2, omega=0.05, lazy=False, device="numpy")
    got = select(G, 200, lam=0.2, omega=0.05, lazy=False, device="cpu")
    assert want.stop_reason == "early_stop" and 10 < len(want) < 200
    _same_run(got, want)


def test_windowed_on_torch_is_unchanged() -> None:
    G = sketch_like(9, n=150, d=8)
    kw = {"method": "windowed", "lam": 0.5, "pool_size": 40, "seed": 3}
    _same_run(select(G, 20, device="cpu", lazy=False, **kw), select(G, 20, lazy=True, **kw))


# ---------------------------------------------------------------------------------------- resume
class _Kill(Exception):
    pass


@pytest.mark.parametrize("first,then", [("cpu", "numpy"), ("numpy", "cpu"), ("cpu", "cpu")])
def test_resume_across_engines(monkeypatch, tmp_path, first: str, then: str) -> None:
    _with_engine(monkeypatch, block=4)
    G = sketch_like(10, n=400, d=12)
    full = select(G, 60, lam=0.4, lazy=False, device="numpy")

    def boom(step: int, index: int) -> None:
        if step == 27:
            raise _Kill

    ck = tmp_path / "ck"
    with pytest.raises(_Kill):
        select(G, 60, lam=0.4, lazy=False, device=first, checkpoint_dir=str(ck), checkpoint_every=5, on_step=boom)
    assert json.loads((ck / "picks.json").read_text())["picks"] == full.indices[:25].tolist()
    resumed = select(G, 60, lam=0.4, lazy=False, device=then, checkpoint_dir=str(ck), checkpoint_every=5)
    assert resumed.stats["replayed"] == 25
    _same_run(resumed, full)
    assert json.loads((ck / "picks.json").read_text())["complete"]


def test_bad_replay_is_refused() -> None:
    eng = DeviceGreedy(sketch_like(11, n=30, d=4), alpha=1.0, lam=0.1, max_updates=5, device="cpu")
    with pytest.raises(ValueError, match="checkpoint"):
        list(eng.picks(5, [3, 3]))


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_cuda_block_engine_equals_numpy() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    G = sketch_like(14, n=20_000, d=64)
    want = select(G, 400, lam=0.2, lazy=False, device="numpy", diagnostics=False)
    got = select(G, 400, lam=0.2, lazy=False, device="cuda", diagnostics=False)
    _same_run(got, want)
    assert got.stats["cuda_graph"] is True
    factored = select(G[:3000], 40, lam=0.2, lazy=False, device="cuda", diagnostics=False)
    _same_run(factored, select(G[:3000], 40, lam=0.2, lazy=False, device="numpy", diagnostics=False))


@pytest.mark.gpu
def test_cuda_block_has_no_host_sync() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    G = sketch_like(15, n=5000, d=32)
    for graphs in (False, True):
        eng = DeviceGreedy(G, alpha=1.0, lam=0.3, max_updates=300, device="cuda", block=16, graphs=graphs)
        list(eng.picks(48))  # warm-up block, capture
        eng._load(48, [])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                eng._run_block(16, 48)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
