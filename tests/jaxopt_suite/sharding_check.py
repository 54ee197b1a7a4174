"""Sharded-parameter check for every registry entry (run by test_contract.py in a subprocess).

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before this interpreter imports jax.
For each entry, params are placed with ``NamedSharding(mesh, P('x'))`` on an explicit 8-device mesh; the
state's ``jax.typeof`` (shape, dtype and sharding) must be identical after ``init``, after an eager
``update`` and after a jitted update, and three jitted steps must match a single-device run (≤ 1e-6 f32).
Entry names given as arguments limit the check to them (all entries otherwise). Prints one JSON line
``{entry: {"devices", "types_equal", "max_diff", "detail"}}``.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_suite import registry

SHAPES = {"w": (16, 3), "b": (8,)}


def _params():
    return {k: jnp.asarray(np.linspace(-1.5, 2.0, int(np.prod(s))).reshape(s) + 0.1 * i, jnp.float32)
            for i, (k, s) in enumerate(SHAPES.items())}


def _loss(params):
    total = 0.0
    for i, (k, p) in enumerate(sorted(params.items())):
        total = total + 0.5 * (i + 1) * jnp.sum((p - 0.25 * (i + 1)) ** 2)
    return total


def _types(tree):
    return jax.tree.map(lambda x: str(jax.typeof(x)), tree)


def _shardings_equivalent(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.sharding.is_equivalent_to(y.sharding, x.ndim) for x, y in zip(la, lb))


def check(entry, mesh):
    tx = entry.build()

    def step(params, state):
        value, grads = jax.value_and_grad(_loss)(params)
        extra = {"value": value} if entry.requires_value else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    # single device reference
    params = _params()
    state = tx.init(params)
    jstep = jax.jit(step)
    for _ in range(3):
        params, state = jstep(params, state)
    single = params

    with jax.set_mesh(mesh):
        sharded = jax.device_put(_params(), NamedSharding(mesh, P("x")))
        state0 = tx.init(sharded)
        _, state_eager = step(sharded, state0)
        jstep = jax.jit(step)
        params, state_jit = jstep(sharded, state0)
        t0, t1, t2 = _types(state0), _types(state_eager), _types(state_jit)
        problems = []
        if t1 != t0:
            problems.append(f"eager update changed state types: {t0} -> {t1}")
        if t2 != t0:
            problems.append(f"jitted update changed state types: {t0} -> {t2}")
        if not (_shardings_equivalent(state0, state_eager) and _shardings_equivalent(state0, state_jit)):
            problems.append("state shardings changed")
        per_param = [x for x in jax.tree.leaves(state0) if x.ndim > 0]
        if any(x.sharding.is_fully_replicated for x in per_param if x.shape[0] % 8 == 0):
            problems.append("a per-parameter state leaf is replicated instead of following the params")
        for _ in range(2):
            params, state_jit = jstep(params, state_jit)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)))
    return {"devices": len(jax.devices()), "types_equal": not problems, "max_diff": diff,
            "detail": "; ".join(problems) or f"types {t0}"}


def main():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    report = {}
    names = sys.argv[1:]
    for entry in [registry.get(n) for n in names] if names else registry.entries():
        try:
            report[entry.name] = check(entry, mesh)
        except Exception:  # noqa: BLE001 - reported per entry; the test shows the traceback
            report[entry.name] = {"devices": len(jax.devices()), "types_equal": False, "max_diff": float("inf"),
                                  "detail": traceback.format_exc()[-3000:]}
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
