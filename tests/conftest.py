import sys
from pathlib import Path

# `from tests.models import ...` must work from test files in subfolders without an __init__.py too.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402  (after the path set-up above)
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture
def fresh_dynamo():
    """Forget earlier compiles and Dynamo's counters before and after a test: Dynamo reuses a graph (and its
    step cache) for another instance of the same class compiled with equal options. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
