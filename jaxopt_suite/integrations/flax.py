"""Flax linen ``TrainState`` support: deliver extra arguments (the loss ``value``...) to the optimizer.

``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)`` calls
``tx.update(grads, opt_state, params)`` without extra arguments; its ``**kwargs`` replace dataclass fields.
So an optimizer that needs the loss never receives it (flax PR #4471, open at flax 0.12.8), and
``state.apply_gradients(grads=g, value=loss)`` fails. :func:`apply_gradients` here is the drop-in that forwards
them::

    from jaxopt_suite.integrations.flax import apply_gradients

    state = apply_gradients(state, grads, value=loss)     # instead of state.apply_gradients(grads=grads)

Users who subclass ``TrainState`` can keep the method-call style with one line::

    class MyState(TrainState):
        def apply_gradients(self, *, grads, **extra_args):
            return jaxopt_suite.integrations.flax.apply_gradients(self, grads, **extra_args)

(the subclass then loses the ability to replace other fields through ``apply_gradients``' keywords; call
``.replace(...)`` for that).

flax is imported when :func:`apply_gradients` first runs (for the fp8 collection name); this module is never
imported by ``jaxopt_suite/__init__.py``.
"""

from __future__ import annotations

from typing import Any

import optax


def _overwrite_with_gradient_key() -> str:
    """The name of flax's fp8 collection whose entries take the gradient itself as the new value."""
    from flax.linen import fp8_ops

    return fp8_ops.OVERWRITE_WITH_GRADIENT


def apply_gradients(state: Any, grads: Any, **extra_args: Any) -> Any:
    """One optimizer step on a linen ``TrainState``, forwarding ``extra_args`` to ``state.tx.update``.

    Computes ``updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra_args)``,
    ``params = optax.apply_updates(params, updates)`` and returns
    ``state.replace(step=state.step + 1, params=params, opt_state=opt_state)``.

    As in flax's own method, when ``grads`` holds the fp8 ``OVERWRITE_WITH_GRADIENT`` collection the optimizer
    sees only the ``'params'`` collection, and the fp8 entries are replaced by their gradients.

    Args:
      state: a ``flax.training.train_state.TrainState`` (or subclass).
      grads: gradients shaped like ``state.params``.
      **extra_args: keyword arguments for ``tx.update``, e.g. ``value=loss``; transformations ignore the ones
        they do not use.

    Returns:
      The updated state.
    """
    fp8_key = _overwrite_with_gradient_key()
    split_fp8 = hasattr(grads, "keys") and fp8_key in grads
    opt_grads = grads["params"] if split_fp8 else grads
    opt_params = state.params["params"] if split_fp8 else state.params

    updates, opt_state = state.tx.update(opt_grads, state.opt_state, opt_params, **extra_args)
    new_params = optax.apply_updates(opt_params, updates)
    if split_fp8:
        new_params = {"params": new_params, fp8_key: grads[fp8_key]}
    return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)
