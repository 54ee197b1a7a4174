"""Parity rows for the torch bridge: every bridge class on the digits MLP.

For each class, our registry entry is compared with (a) the torch optimizer of the same name and (b) the
pure JAX optimizer itself (the ``suite`` reference); discovery repeats each row through the bridge's flat
and simple paths (``@bridge_flat`` / ``@bridge_simple``), which are the rows this module is about. The
``jax`` rows against ``suite`` compare the entry with itself (0 by construction) and only anchor the table.

Tolerances (100 steps) come from the error model (:func:`parity.runner.rounding_response`, K δ): on
max |Δ| in float64, on max |Δ| relative to the parameter scale in float32. ADOPT is
float64 only (its ε floor and clipping amplify float32 rounding) and uses lr 1e-3 with coupled decay,
where the references agree (at lr 1e-2 torch-adopt and pure JAX already differ by 3e-7).
"""

from __future__ import annotations

from .references import suite, torch_adopt, torch_optim
from .runner import ParityCase

STEPS = 100

# (stem, entry, JAX kwargs, torch-style kwargs, torch reference factory, dtypes)
_ROWS = [
    ("sgd", "sgd", dict(learning_rate=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2),
     dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=1e-2), lambda kw: torch_optim("SGD", **kw),
     ("float64", "float32")),
    ("adam", "adam", dict(learning_rate=1e-2, weight_decay=0.1, amsgrad=True),
     dict(lr=1e-2, weight_decay=0.1, amsgrad=True), lambda kw: torch_optim("Adam", **kw), ("float64", "float32")),
    ("adamw", "adamw", dict(learning_rate=1e-2), dict(lr=1e-2), lambda kw: torch_optim("AdamW", **kw),
     ("float64", "float32")),
    ("adopt", "adopt", dict(learning_rate=1e-3, weight_decay=1e-2), dict(lr=1e-3, weight_decay=1e-2),
     lambda kw: torch_adopt(**kw), ("float64",)),
    ("asgd", "asgd", dict(learning_rate=0.05, t0=10, lambd=1e-2, weight_decay=1e-3),
     dict(lr=0.05, t0=10, lambd=1e-2, weight_decay=1e-3), lambda kw: torch_optim("ASGD", **kw),
     ("float64", "float32")),
]

# error-model tolerances (parity.runner.rounding_response) on max |Δ| (float64) and max rel (float32)
_MEASURE = {"float64": "abs", "float32": "rel"}
_SHORT = {"float64": "f64", "float32": "f32"}


def cases():
    out = []
    for stem, entry, jkw, tkw, torch_ref, dtypes in _ROWS:
        for dtype in dtypes:
            for label, ref in (("torch", torch_ref(tkw)), ("jax", suite(entry, jkw))):
                out.append(ParityCase(
                    name=f"bridge_{stem}_vs_{label}_digits_{_SHORT[dtype]}",
                    entry=entry, kwargs=jkw, reference=ref, problem="digits_mlp", dtype=dtype, steps=STEPS,
                    bridge_kwargs=tkw, measure=_MEASURE[dtype],
                    note="bridge class on the digits MLP vs " + ("torch" if label == "torch" else "pure JAX"),
                ))
    return out
