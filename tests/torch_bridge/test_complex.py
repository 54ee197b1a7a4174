"""Complex parameters in the torch bridge, against torch.optim (issue 11 item 5, complex half).

torch.optim steps a complex parameter as ``torch.view_as_real(param)`` with ``view_as_real(grad)`` and real
views of its state, and keeps that state as complex tensors of the parameter's shape (``exp_avg_sq``'s real
and imaginary parts are the second moments of the two components). The bridge's elementwise classes (SGD,
Adam, AdamW, ASGD, ADOPT, Lookahead around one of them) do the same; the others raise naming the parameter.

Error model of the tolerances: both sides compute the same gradient with torch autograd from parameters that
differ only by rounding, and each step of these elementwise rules is a handful of roundings of O(|p| + lr)
values on a well-conditioned problem (gradients bounded away from 0: the targets lie ~3 away from the start,
so no sign flips that Adam's m/sqrt(v) would amplify). After ``N`` steps the difference is below
``K * N * eps * scale`` with ``K = 16`` roundings per step, ``scale = 1 + max |value|`` (measured over the whole sweep: at most 25
eps * scale after 6 steps, SGD Nesterov + maximize in complex128, where maximizing makes the iteration expand
and amplify earlier roundings; under 4 for every other row; the bound is K * N = 96). complex128 (eps 2.2e-16, N = 6): ~1e-13, the suite's ~1e-12 float64 parity;
complex64 (eps 1.2e-7): ~5e-5. Holds on any x86-64 CPU: it does not depend on FMA contraction or the
vector width (each of those only moves single roundings).
"""

import copy
import pickle

import jax
import pytest
import torch

import torch_bridge as tb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
EPS = {torch.complex64: torch.finfo(torch.float32).eps, torch.complex128: torch.finfo(torch.float64).eps}
STEPS = 6
K = 16  # roundings per step in the error bound (module docstring)


def _torch_adopt():
    adopt = pytest.importorskip("adopt")
    return adopt.ADOPT


# (id, bridge class, torch class (or a callable returning it), kwargs): every elementwise class and its main options
CASES = [
    ("sgd", tb.SGD, torch.optim.SGD, dict(lr=0.05)),
    ("sgd-momentum-dampening-wd", tb.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3,
                                                                 weight_decay=0.1)),
    ("sgd-nesterov-maximize", tb.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True)),
    ("adam", tb.Adam, torch.optim.Adam, dict(lr=0.05)),
    ("adam-amsgrad-wd", tb.Adam, torch.optim.Adam, dict(lr=0.05, amsgrad=True, weight_decay=0.1)),
    ("adam-maximize", tb.Adam, torch.optim.Adam, dict(lr=0.05, betas=(0.8, 0.99), maximize=True)),
    ("adamw", tb.AdamW, torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    ("adamw-amsgrad", tb.AdamW, torch.optim.AdamW, dict(lr=0.05, amsgrad=True)),
    ("asgd", tb.ASGD, torch.optim.ASGD, dict(lr=0.05, t0=2, weight_decay=0.1)),
    ("adopt", tb.ADOPT, _torch_adopt, dict(lr=0.05)),
    ("adopt-decouple-wd", tb.ADOPT, _torch_adopt, dict(lr=0.05, weight_decay=0.1, decouple=True)),
]
CASE_IDS = [c[0] for c in CASES]
BY_ID = {c[0]: c for c in CASES}
# the default run: each class once with its state-heavy option, complex128 flat and complex64 simple
DEFAULT = [("sgd-momentum-dampening-wd", torch.complex64, False), ("adam-amsgrad-wd", torch.complex128, True),
           ("asgd", torch.complex128, True), ("adopt", torch.complex64, True)]


def torch_class(case):
    cls = case[2]
    return cls if isinstance(cls, type) else cls()


def start(dtype, seed=0):
    """A complex matrix, a real vector (mixed params in one group) and a complex 0-d parameter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 4, dtype=dtype, generator=g)
    r = torch.randn(5, dtype=REAL[dtype], generator=g)
    z = torch.randn((), dtype=dtype, generator=g)
    return [w, r, z]


def loss_of(ps):
    """Real loss with different curvature on the real and imaginary parts (per-component second moments
    matter) and a non-quadratic imaginary term; targets ~3 away, so the gradients keep their signs."""
    w, r, z = ps
    d = w - (3.0 + 2.0j)
    return ((1.0 + 0.5 * d.real ** 2).sum() * 0.5 + (d.imag ** 4).sum() * 0.1 + ((r - 3.0) ** 2).sum()
            + (z - (1.0 - 3.0j)).abs() ** 2 * 2.0)


def run(opt, ps, steps, after=None):
    for i in range(steps):
        opt.zero_grad()
        loss_of(ps).backward()
        opt.step()
        if after is not None:
            after(i, opt, ps)


def leaf_copies(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def tol(dtype, *tensors, steps=STEPS):
    scale = 1.0 + max(float(t.detach().abs().max()) for t in tensors)
    return K * steps * EPS[dtype] * scale


def assert_close(a, b, dtype, what, steps=STEPS):
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    err = float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0
    assert err <= tol(dtype, b, steps=steps), (what, err, tol(dtype, b, steps=steps))


def assert_state_close(bridge_opt, torch_opt, pb, pt, dtype, steps=STEPS):
    for i, (a, b) in enumerate(zip(pb, pt)):
        sa, sb = bridge_opt.state[a], torch_opt.state[b]
        assert set(sa) == set(sb), (i, sorted(sa), sorted(sb))
        for key, vb in sb.items():
            va = sa[key]
            if not (torch.is_tensor(vb) and vb.dtype == b.dtype and vb.shape == b.shape):
                # per-parameter scalars (step; ASGD's eta and mu, float32 in both): float32 roundings
                assert float(va) == pytest.approx(float(vb), rel=1e-6), (i, key)
                continue
            assert_close(va, vb, dtype, (i, key), steps)


def check_parity(case_id, dtype, flat, write_back="copy"):
    _, bridge_cls, _, kw = BY_ID[case_id]
    torch_cls = torch_class(BY_ID[case_id])
    ps = start(dtype)
    pb, pt = leaf_copies(ps), leaf_copies(ps)
    with jax.enable_x64(dtype == torch.complex128):
        ob = bridge_cls(pb, flat=flat, write_back=write_back, **kw)
        ot = torch_cls(pt, foreach=False, **kw)
        run(ob, pb, STEPS)
        run(ot, pt, STEPS)
        for i, (a, b) in enumerate(zip(pb, pt)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.grad.dtype == b.dtype  # p.grad stays complex (the bridge's buffer is its real view)
            assert_close(a.grad, b.grad, dtype, ("grad", i))
            assert_close(a, b, dtype, ("param", i))
        assert_state_close(ob, ot, pb, pt, dtype)
        # a real change, not a no-op, on every parameter
        assert all(float((a.detach() - p).abs().min()) > 1e-3 for a, p in zip(pb, ps))


@pytest.mark.parametrize("case_id,dtype,flat", DEFAULT, ids=[f"{c}-{str(d)[6:]}-{'flat' if f else 'simple'}"
                                                             for c, d, f in DEFAULT])
def test_parity_with_torch(case_id, dtype, flat):
    check_parity(case_id, dtype, flat)


@pytest.mark.slow
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "simple"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["complex64", "complex128"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_parity_with_torch_sweep(case_id, dtype, flat):
    check_parity(case_id, dtype, flat)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["sgd-momentum-dampening-wd", "adam-amsgrad-wd", "asgd"])
def test_parity_with_torch_swap_write_back(case_id):
    check_parity(case_id, torch.complex128, True, write_back="swap")


def test_complex_and_real_share_one_flat_buffer_and_views():
    """complex64 joins the float32 flat buffer as its real view: one buffer, ``p`` and ``p.grad`` are complex
    views of their segments (zero copy), ``p.grad`` stays the tensor autograd made (moved onto its segment once
    it survives a step)."""
    ps = leaf_copies(start(torch.complex64))
    opt = tb.Adam(ps, lr=0.05)
    run(opt, ps, 1)
    opt.step()  # the same .grad tensors at a second step: moved onto their segments
    (buf,) = opt._runtime[0].buffers
    assert buf.flat and buf.flat_p.dtype == torch.float32
    for p, off in zip(ps, buf.layout.offsets):
        assert p.data_ptr() == buf.flat_p.data_ptr() + off * 4
        assert p.grad.data_ptr() == buf.flat_g.data_ptr() + off * 4
    g = ps[0].grad
    loss_of(ps).backward()  # accumulates in place into the segment, as torch
    assert ps[0].grad is g
    opt.zero_grad(set_to_none=False)
    assert ps[0].grad is g and not bool(g.abs().any())


def test_none_grad_skips_complex_param_as_torch():
    """A complex parameter without a gradient at some step is skipped (segment mode), as torch skips it."""
    ps = start(torch.complex128)
    pb, pt = leaf_copies(ps), leaf_copies(ps)

    with jax.enable_x64(True):
        ob, ot = tb.Adam(pb, lr=0.05), torch.optim.Adam(pt, lr=0.05, foreach=False)
        for i in range(4):
            for opt, p in ((ob, pb), (ot, pt)):
                opt.zero_grad()
                loss_of(p).backward()
                if i == 1:
                    p[0].grad = None
                opt.step()
        for i, (a, b) in enumerate(zip(pb, pt)):
            assert_close(a, b, torch.complex128, ("param", i), 4)
        assert_state_close(ob, ot, pb, pt, torch.complex128, 4)
        assert float(ob.state[pb[0]]["step"]) == 3.0 and float(ob.state[pb[1]]["step"]) == 4.0


@pytest.mark.parametrize("flat", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["flat", "simple"])
def test_state_dict_round_trip_and_resume(flat):
    """state_dict holds complex state; loading it into a fresh bridge optimizer, and into torch.optim.Adam,
    resumes the trajectory (bit-identical for the bridge; within the error model for torch)."""
    dtype = torch.complex128
    ps = start(dtype)
    kw = dict(lr=0.05, amsgrad=True)
    with jax.enable_x64(True):
        pa = leaf_copies(ps)
        oa = tb.Adam(pa, flat=flat, **kw)
        run(oa, pa, 3)
        sd = oa.state_dict()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert sd["state"][0][key].dtype == dtype and sd["state"][0][key].shape == (3, 4)
            assert sd["state"][1][key].dtype == torch.float64
        pb, pt = leaf_copies(pa), leaf_copies(pa)
        ob = tb.Adam(pb, flat=flat, **kw)
        ob.load_state_dict(copy.deepcopy(sd))
        ot = torch.optim.Adam(pt, foreach=False, **kw)
        ot.load_state_dict(copy.deepcopy(sd))
        run(oa, pa, 3)
        run(ob, pb, 3)
        run(ot, pt, 3)
        for a, b, t in zip(pa, pb, pt):
            assert torch.equal(a, b)
            assert_close(a, t, dtype, "resume in torch.optim")
        assert_state_close(ob, ot, pb, pt, dtype)
        # and back: torch.optim's complex state loads into the bridge
        pc = leaf_copies(pt)
        oc = tb.Adam(pc, flat=flat, **kw)
        oc.load_state_dict(ot.state_dict())
        assert_state_close(oc, ot, pc, pt, dtype)


@pytest.mark.parametrize("flat", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["flat", "simple"])
def test_state_edits_take_effect(flat):
    """In-place edits of a complex state tensor (also through its view_as_real) and assignments take effect
    at the next step, exactly as the same edits in torch.optim."""
    dtype = torch.complex128
    ps = start(dtype)
    pb, pt = leaf_copies(ps), leaf_copies(ps)

    def edit(i, opt, p):
        if i == 1:
            opt.state[p[0]]["exp_avg"].mul_(-2.0)
            torch.view_as_real(opt.state[p[2]]["exp_avg_sq"])[1].mul_(5.0)  # the imaginary component only
        if i == 3:
            opt.state[p[0]]["exp_avg_sq"] = torch.full((3, 4), 0.5 + 2.0j, dtype=dtype)

    with jax.enable_x64(True):
        ob, ot = tb.Adam(pb, lr=0.05, flat=flat), torch.optim.Adam(pt, lr=0.05, foreach=False)
        run(ob, pb, STEPS, edit)
        run(ot, pt, STEPS, edit)
        for i, (a, b) in enumerate(zip(pb, pt)):
            assert_close(a, b, dtype, ("param", i))
        assert_state_close(ob, ot, pb, pt, dtype)
        # the edits changed the trajectory (the test can fail): without them the bridge ends elsewhere
        pc = leaf_copies(ps)
        oc = tb.Adam(pc, lr=0.05, flat=flat)
        run(oc, pc, STEPS)
        assert float((pc[0] - pb[0]).detach().abs().max()) > 1e-3
        assert float((pc[2] - pb[2]).detach().abs()) > 1e-3


def test_load_real_state_for_complex_param_raises():
    ps = leaf_copies(start(torch.complex64))
    opt = tb.Adam(ps, lr=0.05)
    run(opt, ps, 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].real.clone()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(3, 4\)\).*'exp_avg'.*complex64"):
        opt.load_state_dict(sd)
    opt.zero_grad()
    loss_of(ps).backward()
    opt.step()  # the failed load replaced nothing: the state is still complex and steps
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.complex64
    assert not torch.equal(before[0], ps[0].detach())


def test_assigned_real_state_for_complex_param_raises():
    ps = leaf_copies(start(torch.complex64))
    opt = tb.SGD(ps, lr=0.05, momentum=0.9)
    run(opt, ps, 1)
    opt.state[ps[0]]["momentum_buffer"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 0 has dtype float32, expected complex64"):
        run(opt, ps, 1)


def test_lookahead_around_elementwise_inner():
    """Lookahead(bridge Adam) on complex params matches Lookahead around torch.optim.Adam (slow weights
    complex, like the parameter)."""
    dtype = torch.complex128
    ps = start(dtype)
    pb, pt = leaf_copies(ps), leaf_copies(ps)
    with jax.enable_x64(True):
        ob = tb.Lookahead(tb.Adam(pb, lr=0.05), k=2, alpha=0.6)
        ot = tb.Lookahead(torch.optim.Adam(pt, lr=0.05, foreach=False), k=2, alpha=0.6)
        run(ob, pb, 5)
        run(ot, pt, 5)
        for i, (a, b) in enumerate(zip(pb, pt)):
            assert_close(a, b, dtype, ("param", i), 5)
            assert_close(ob.state[a]["slow_param"], ot.state[b]["slow_param"], dtype, ("slow", i), 5)
        assert ob.state[pb[0]]["slow_param"].dtype == dtype


NON_ELEMENTWISE = {
    "JaxOptimizer": lambda ps: tb.JaxOptimizer(ps, "adam", lr=0.01),
    "AutoSGM": lambda ps: tb.AutoSGM(ps),
    "EnhancedSGD": lambda ps: tb.EnhancedSGD(ps, lr=0.01),
    "ELRA": lambda ps: tb.ELRA(ps, lr=1e-3),
}


@pytest.mark.filterwarnings("ignore:ELRA. JAX x64 is off:UserWarning")
@pytest.mark.parametrize("name", list(NON_ELEMENTWISE))
def test_non_elementwise_classes_raise_naming_the_parameter(name):
    ps = [torch.zeros(2, requires_grad=True), torch.zeros(3, dtype=torch.complex64, requires_grad=True)]
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 \(shape \(3,\)\) is complex \(complex64\)"):
        NON_ELEMENTWISE[name](ps)
    if name != "ELRA":  # ELRA takes one global group only
        opt = NON_ELEMENTWISE[name]([ps[0]])
        with pytest.raises(ValueError, match=r"parameter 0 of param group 1 \(shape \(3,\)\) is complex"):
            opt.add_param_group({"params": [ps[1]]})
        assert len(opt.param_groups) == 1  # the failed group was not added


def test_complex128_needs_x64():
    p = torch.zeros(2, dtype=torch.complex128, requires_grad=True)
    assert not jax.config.jax_enable_x64
    with pytest.raises(TypeError, match="complex128 parameters need JAX's 64-bit mode"):
        tb.Adam([p], lr=0.1)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_complex32_is_not_supported():
    p = torch.zeros(2, dtype=torch.complex32, requires_grad=True)
    with pytest.raises(TypeError, match="dtype torch.complex32 is not supported"):
        tb.Adam([p], lr=0.1)


def test_noncontiguous_param_and_conjugated_grad_simple_path():
    """A non-contiguous complex parameter takes the simple path; a lazily conjugated ``.grad`` is resolved (torch.optim
    itself refuses one: view_as_real of an unresolved conjugate), so the step equals torch's on the resolved grad."""
    w0 = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)).t()
    wb, wt = torch.nn.Parameter(w0.clone().t().contiguous().t()), torch.nn.Parameter(w0.clone())
    assert not wb.is_contiguous()
    ob, ot = tb.Adam([wb], lr=0.05), torch.optim.Adam([wt], lr=0.05, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        g = torch.randn(3, 4, dtype=torch.complex64, generator=gen) + 3.0
        wb.grad, wt.grad = g.conj(), g.conj().resolve_conj()
        ob.step()
        ot.step()
    assert not ob._runtime[0].buffers[0].flat
    assert_close(wb, wt, torch.complex64, "param", 3)
    assert_state_close(ob, ot, [wb], [wt], torch.complex64, 3)


# pickling the optimizer pickles its params, which carry the bridge's sparse-gradient hooks (real ones too)
@pytest.mark.filterwarnings("ignore:backward hook .* will not be serialized:UserWarning")
def test_deepcopy_pickle_and_nonfinite_policies():
    ps = leaf_copies(start(torch.complex64))
    opt = tb.SGD(ps, lr=0.05, momentum=0.9)
    run(opt, ps, 2)
    twin = copy.deepcopy(opt)
    qs = twin.param_groups[0]["params"]
    run(opt, ps, 2)
    run(twin, qs, 2)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    back = pickle.loads(pickle.dumps(opt))
    assert back.state[back.param_groups[0]["params"][0]]["momentum_buffer"].dtype == torch.complex64
    for policy in ("raise", "skip"):
        ps = leaf_copies(start(torch.complex64))
        opt = tb.Adam(ps, lr=0.05, nonfinite=policy)
        before = [p.detach().clone() for p in ps]
        loss_of(ps).backward()
        ps[0].grad[1, 2] = complex(1.0, float("nan"))  # only an imaginary component is NaN
        if policy == "raise":
            with pytest.raises(FloatingPointError, match=r"parameter 0 of param group 0 \(shape \(3, 4\)\)"):
                opt.step()
        else:
            opt.step()
            assert opt.state_dict()["param_groups"][0]["nonfinite_skips"] == 1
        assert all(torch.equal(b, p.detach()) for b, p in zip(before, ps))


def test_checkpoint_conversion_refuses_complex_params():
    checkpoint = pytest.importorskip("torch_bridge.checkpoint")
    ps = leaf_copies(start(torch.complex64))
    opt = tb.Adam(ps, lr=0.05)
    run(opt, ps, 1)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(shape \(3, 4\)\) is complex"):
        checkpoint.to_optax(opt, [jax.numpy.asarray(p.detach().numpy()) for p in ps])
