"""Parity between jaxopt-suite and the reference implementations (torch.optim, optax, reference packages).

* :mod:`parity.problems` — test problems defined once for JAX and PyTorch;
* :mod:`parity.references` — everything that can be stepped (our registry entries, torch, optax, reference
  packages) behind one interface;
* :mod:`parity.runner` — :class:`~parity.runner.ParityCase`, the runner and case discovery
  (``parity/cases_<family>.py``);
* ``python -m parity`` prints the table and exits non-zero when a row exceeds its tolerance.
"""
