import sys
from pathlib import Path

# `from tests.models import ...` must work from test files in subfolders without an __init__.py too.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
