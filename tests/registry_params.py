"""Registry-entry parametrisations shared by the test modules."""

from __future__ import annotations

import pytest

from jaxopt_suite import registry

ENTRIES = registry.entries()

#: ``entry`` over every registry entry, ids the entry names.
by_entry = pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])

#: The last registered entry of each family: the variant with the most options on (adamw, asgd_momentum,
#: lookahead_adam, autosgm_parcor, elra_dnn). Checks of code that every entry of a family shares (the
#: factory's vmap, sharding, wrapper and flat-layout paths) run these in the default suite and the other
#: entries with -m slow.
ONE_PER_FAMILY = tuple({e.family: e.name for e in ENTRIES}.values())

#: ``entry`` over every registry entry; those outside :data:`ONE_PER_FAMILY` are marked ``slow``.
by_entry_others_slow = pytest.mark.parametrize(
    "entry", [pytest.param(e, id=e.name, marks=() if e.name in ONE_PER_FAMILY else pytest.mark.slow)
              for e in ENTRIES])
