"""Averaged SGD exactly as ``torch.optim.ASGD`` (2.x, single-tensor path), plus an optional momentum.

Update rule (per parameter with a gradient; t = that parameter's step after increment; η and μ are the
values stored at the previous step, η₀ = lr, μ₀ = 1)::

    g ← −g (maximize);   g ← g + λθ
    b ← m·b + g;  d = b  (momentum m ≠ 0, b₀ = 0)   |   d = g   (torch: no momentum)
    θ ← θ (1 − lambd·η) − η·d
    ax ← θ if μ = 1 else ax + μ (θ − ax)
    η ← lr / (1 + lambd·lr·t)^alpha;   μ ← 1 / max(1, t − t0)

η lags the learning rate by one step, and η, μ are rounded to the scalar dtype (float32 unless torch's
default dtype is float64) every step. ``ax`` is θ up to step t0 + 2 and then the uniform mean of θ over
steps t0 + 2 … t; it never feeds back into θ (read it with :func:`asgd_averaged_params`).

References:
  Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging", SIAM J. Control Optim. 1992.
  Bottou, "Stochastic Gradient Descent Tricks", 2012 (the η schedule).
  PyTorch ``torch.optim.ASGD`` 2.x (``foreach=False``), which this reproduces to rounding; the momentum
  option follows lucid's ``optim.ASGD`` (ChanLumerico/lucid) buffer ``b ← m·b + g``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from . import _common as C
from .nonfinite import nonfinite_option

SCALAR_DTYPES = ("float32", "float64")


class ASGDState(NamedTuple):
    """State of :func:`scale_by_asgd`.

    Attributes:
      count: per-leaf int32 step ``t`` (torch ``step``).
      eta: per-leaf step size η for the *next* step, in the scalar dtype (torch ``eta``).
      avg_weight: per-leaf averaging weight μ for the next step, in the scalar dtype (torch ``mu``).
      ax: the averaged parameters (torch ``ax``).
      momentum_buffer: ``b`` when a momentum is used, else ``None``.
    """

    count: Any
    eta: Any
    avg_weight: Any
    ax: Any
    momentum_buffer: Any


def _wide_dtype():
    """float64 when x64 is on (torch forms η and μ in double before rounding), else float32."""
    # ``float`` canonicalises to float64 only when x64 is on (no truncation warning, unlike asking for float64).
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


@C.declare_static("scalar_dtype", "segments")
def scale_by_asgd(
    learning_rate: optax.ScalarOrSchedule = 1e-2,
    lambd: Any = 1e-4,
    alpha: Any = 0.75,
    t0: Any = 1e6,
    momentum: Optional[Any] = None,
    *,
    scalar_dtype: str = "float32",
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    """ASGD's step with per-leaf η, μ and averages; outputs the full update ``−lambd·η·θ − η·d``.

    This block owns the step size (no :func:`optax.scale_by_learning_rate` after it). A schedule is
    evaluated at each leaf's count before the increment (0 at the first step). ``update`` requires params.

    Args:
      learning_rate: lr ≥ 0 or a schedule.  lambd: decay term.  alpha: power of the η schedule.
      t0: the step after which averaging starts.
      momentum: ``None`` (torch) or m ∈ [0, 1] for the buffer ``b ← m·b + g`` (m = 0 is exactly torch).
      scalar_dtype: ``"float32"`` (torch's default) or ``"float64"`` (torch with default dtype float64):
        the dtype η and μ are stored and rounded in.
      segments: flat layout of the torch bridge.
    """
    C.check_choice("scalar_dtype", scalar_dtype, SCALAR_DTYPES)
    sdt = jnp.dtype(scalar_dtype)

    def lr_at(count):
        return learning_rate(count) if callable(learning_rate) else learning_rate

    def init_fn(params):
        return ASGDState(
            count=jax.tree.map(lambda p: C.leaf_scalar(p, segments), params),
            eta=jax.tree.map(lambda p: C.leaf_scalar(p, segments, sdt, lr_at(jnp.zeros((), jnp.int32))), params),
            avg_weight=jax.tree.map(lambda p: C.leaf_scalar(p, segments, sdt, 1.0), params),
            ax=jax.tree.map(jnp.zeros_like, params),
            momentum_buffer=None if momentum is None else jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None, *, grad_mask=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("scale_by_asgd needs params (the decay term and the average use them).")
        wide = _wide_dtype()
        buffers = state.momentum_buffer if momentum is not None else jax.tree.map(lambda _: None, updates)

        def one(g, theta, count, eta, mu, ax, buf):
            real = C.real_dtype(theta.dtype)
            lr = jnp.asarray(lr_at(count))
            eta = jnp.where(count == 0, lr.astype(sdt), eta)  # lazy init: η = the current lr
            step = C.safe_increment(count)
            if buf is None:
                direction, new_buf = g, None
            else:
                m = jnp.asarray(momentum)
                accumulated = (m.astype(real) * buf + g).astype(g.dtype)
                direction = jnp.where(m == 0, g, accumulated)
                new_buf = jnp.where(m != 0, accumulated, buf)
            # torch rounds θ twice: θ·(1 − lambd·η), then − η·d. Form that θ' and emit u = θ' − θ, which is
            # exact (Sterbenz) whenever θ' is within a factor 2 of θ, so θ + u reproduces torch's rounding.
            eta_w = eta.astype(wide)
            keep = C.per_element((1 - jnp.asarray(lambd).astype(wide) * eta_w), segments).astype(real)
            eta_el = C.per_element(eta, segments).astype(real)
            target = (theta * keep).astype(theta.dtype) - (eta_el * direction).astype(theta.dtype)
            # An infinite θ that torch keeps (θ' = θ, e.g. after an inf gradient) needs u = 0: θ' − θ is NaN.
            # Finite θ take the unchanged branch, so their values are bitwise those of the plain difference.
            u = jnp.where(jnp.isinf(theta) & (target == theta), jnp.zeros_like(target), target - theta)
            u = u.astype(g.dtype)
            new_theta = (theta + u).astype(theta.dtype)
            mu_el = C.per_element(mu, segments).astype(real)
            new_ax = jnp.where(mu_el == 1, new_theta, (ax + (new_theta - ax) * mu_el).astype(ax.dtype))
            # η and μ for the next step: formed in double when available, rounded to the scalar dtype
            lr_w, t_w = lr.astype(wide), step.astype(wide)
            new_eta = (lr_w / (1 + jnp.asarray(lambd).astype(wide) * lr_w * t_w) ** jnp.asarray(alpha).astype(wide))
            new_mu = 1 / jnp.maximum(jnp.ones((), wide), t_w - jnp.asarray(t0).astype(wide))
            return u, step, new_eta.astype(sdt), new_mu.astype(sdt), new_ax, new_buf

        res = jax.tree.map(
            one, updates, params, state.count, state.eta, state.avg_weight, state.ax, buffers,
            is_leaf=lambda x: x is None,
        )
        pick = lambda i: jax.tree.map(lambda _, r: r[i], updates, res)  # noqa: E731
        new = ASGDState(
            count=pick(1), eta=pick(2), avg_weight=pick(3), ax=pick(4),
            momentum_buffer=None if momentum is None else pick(5),
        )
        new = ASGDState(*[None if n is None else C.masked_tree(grad_mask, n, o, segments)
                          for n, o in zip(new, state)])
        return pick(0), new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@C.declare_static("maximize", "scalar_dtype", "segments")
@nonfinite_option()
def asgd(
    learning_rate: optax.ScalarOrSchedule = 1e-2,
    lambd: Any = 1e-4,
    alpha: Any = 0.75,
    t0: Any = 1e6,
    weight_decay: Any = 0.0,
    momentum: Optional[Any] = None,
    *,
    maximize: bool = False,
    scalar_dtype: str = "float32",
    segments: Optional[C.FlatLayout] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Averaged SGD exactly as ``torch.optim.ASGD`` (``foreach=False``), with an optional momentum.

    .. math::
        \theta_t = \theta_{t-1}(1 - \lambda_d\eta_{t-1}) - \eta_{t-1} d_t,\quad
        \eta_t = \frac{lr}{(1 + \lambda_d\,lr\,t)^{\alpha}},\quad
        \bar\theta_t = \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1}),\quad
        \mu_t = \frac{1}{\max(1, t - t_0)}

    with ``d_t = g_t = ±∇f + λθ`` (torch), or ``d_t = b_t = m\,b_{t-1} + g_t`` with a momentum m.
    With ``lambd = 0``, η = lr and the params follow ``torch.optim.SGD(lr, momentum=m, weight_decay=λ)``.

    Args:
      learning_rate: lr ≥ 0 or a schedule (η lags it by one step, as in torch).
      lambd: decay term ≥ 0 (torch's ``lambd``).  alpha: η-schedule power ≥ 0.  t0: averaging start ≥ 0.
      weight_decay: λ ≥ 0, coupled L2.
      momentum: ``None`` (default, torch) or m ∈ [0, 1]; a number keeps a buffer (m = 0 is exactly torch).
      maximize: ascend instead of descend (negation before decay).
      scalar_dtype: ``"float32"`` (torch's default scalar dtype) or ``"float64"`` (torch with default dtype
        float64): the dtype η and μ are stored and rounded in. A string, so inject_hyperparams keeps it static.
      segments: flat layout of the torch bridge.

    Extra args: ``grad_mask`` (per-leaf bools; False leaves are skipped entirely). Others are ignored.
    ``update`` requires params. The average is :func:`asgd_averaged_params`.

    References:
      Polyak & Juditsky 1992; PyTorch ``torch.optim.ASGD``; lucid ``optim.ASGD`` (momentum buffer).
    """
    C.check_learning_rate(learning_rate)
    C.check_range("lambd", lambd, ge=0.0)
    C.check_range("alpha", alpha, ge=0.0)
    C.check_range("t0", t0, ge=0.0)
    C.check_range("weight_decay", weight_decay, ge=0.0)
    C.check_range("momentum", momentum, ge=0.0, le=1.0, optional=True)  # None: no momentum buffer
    C.static_bool("maximize", maximize)
    C.check_choice("scalar_dtype", scalar_dtype, SCALAR_DTYPES)
    return C.chain(
        C.maybe_maximize(maximize),
        C.add_coupled_weight_decay(weight_decay),
        scale_by_asgd(learning_rate, lambd, alpha, t0, momentum, scalar_dtype=scalar_dtype, segments=segments),
        C.zero_masked(segments=segments),
    )


def asgd_averaged_params(state: Any) -> Any:
    """The averaged parameters ``ax`` of the first :class:`ASGDState` found in a (possibly nested) state.

    ``ax`` holds values only for leaves that have taken a step (zeros before, as torch creates it lazily).
    Raises ``ValueError`` when the state contains no ASGD state.
    """
    stack = [state]
    while stack:
        node = stack.pop(0)
        if isinstance(node, ASGDState):
            return node.ax
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (tuple, list)):
            stack.extend(node)
    raise ValueError("The state contains no ASGDState; was the optimizer built with asgd()?")
