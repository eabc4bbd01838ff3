"""Kernel tests: the ops run in this process; the Triton kernels run under TRITON_INTERPRET=1 in a child.

Tests marked ``interpreted`` launch a Triton kernel on CPU tensors. The interpreter has to be switched on
before triton is first imported (Note [Lazy Triton] in cachedit/kernels/_triton.py), and switching it on
here would leak into every other test of this process. So a process without TRITON_INTERPRET=1 deselects
them, and test_interpreted.py runs them in a child process that has the variable set.
"""

import os

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreted: launches a Triton kernel on CPU tensors; runs in test_interpreted.py's child"
    )


def pytest_collection_modifyitems(config, items):
    if INTERPRETING:
        # The interpreter computes in numpy, which warns about the overflows and inf - inf that the
        # tests provoke on purpose with ±max and infinite values.
        for item in items:
            item.add_marker(pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"))
        return
    deselected = [item for item in items if item.get_closest_marker("interpreted")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("interpreted")]
