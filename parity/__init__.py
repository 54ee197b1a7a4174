"""Parity between jaxopt-suite and the reference implementations (torch.optim, optax, reference packages).

* :mod:`parity.problems` — test problems defined once for JAX and PyTorch (``quad``, ``rosenbrock``,
  ``mlp``, ``digits_mlp`` and the negated ``quad_neg``/``mlp_neg`` for ``maximize`` runs);
* :mod:`parity.references` — everything that can be stepped (our registry entries, the torch bridge,
  torch.optim, optax, reference packages) behind one interface;
* :mod:`parity.runner` — :class:`~parity.runner.ParityCase`, the runner and case discovery;
* ``python -m parity`` prints the table and exits non-zero when a row exceeds its tolerance
  (``-k WORD`` filters, ``--list`` lists, ``--backend jax|bridge_flat|bridge_simple`` selects ours).

Tolerances: a case's bar is ``K δ`` (:func:`parity.runner.rounding_response`; K = 8 by default), where δ
is how far our own trajectory moves when every step carries one rounding error per gradient element,
loss and parameter. A case may raise K or declare ``atol``/``rtol`` only with a ``tolerance_reason``.

Adding rows for an optimizer family: create ``parity/cases_<family>.py`` exposing ``CASES`` (a list of
``ParityCase``) or ``cases()``. Discovery imports every such module; ``tests/parity/test_parity.py`` runs
each case through the same runner, so nothing else needs editing. A case whose registry entry is not
registered is reported as skipped with that reason. Reference packages are imported lazily inside the
reference builders, so declaring a case imports nothing heavy.
"""
