"""Adapters to other libraries. Each submodule imports its library lazily; the core package never imports them.

* :mod:`jaxopt_suite.integrations.flax` — ``apply_gradients`` for linen ``TrainState`` that forwards extra
  arguments such as ``value`` to the transformation.
"""
