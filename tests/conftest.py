"""Session-wide hooks of the test suite."""

import os
import shutil
import tempfile

#: One XLA compilation cache per pytest run, shared by the xdist workers (they inherit the variable the
#: controller sets in ``pytest_configure``, which runs before they start). Many tests build the same
#: optimizer on the same shapes in fresh ``jit`` objects; with the cache the second one loads the compiled
#: executable instead of running XLA again (tracing and lowering still run, so every test still exercises
#: its own code). The cache is keyed by the HLO, the compile options and the jax/jaxlib versions, so a hit
#: is the same executable. A fresh directory per run keeps local timings equal to CI's; set
#: ``JAXOPT_TEST_XLA_CACHE=0`` to compile everything afresh.
_CACHE_ENV = "JAXOPT_TEST_XLA_CACHE_DIR"


def pytest_configure(config):
    if os.environ.get("JAXOPT_TEST_XLA_CACHE", "1") == "0":
        return
    directory = os.environ.get(_CACHE_ENV)
    if directory is None:
        if hasattr(config, "workerinput"):  # a worker whose controller did not set one: leave it alone
            return
        directory = tempfile.mkdtemp(prefix="jaxopt-suite-xla-cache-")
        os.environ[_CACHE_ENV] = directory
        config._jaxopt_xla_cache_owned = directory
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    owned = getattr(config, "_jaxopt_xla_cache_owned", None)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)
        os.environ.pop(_CACHE_ENV, None)


def pytest_terminal_summary(terminalreporter):
    """Print the bad-input campaign's count table (tests/test_bad_input_campaign.py) when it ran."""
    import sys

    campaign = sys.modules.get("tests.campaign")
    if campaign is None or not campaign.RECORDED:
        return
    terminalreporter.section("bad-input campaign (tests/campaign.py)")
    for line in campaign.table(campaign.RECORDED).splitlines():
        terminalreporter.write_line(line)
