from __future__ import annotations

import pytest
from peft_core.plugins import registry


@pytest.fixture(autouse=True)
def scale_method():
    """Registers the test-only 'scale' method (again after a test reset the registry)."""
    import scale_method as plugin

    if "scale" not in registry().methods:
        registry().register(plugin, name="scale-method-for-tests")
    return plugin
