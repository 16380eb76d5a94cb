"""The test suite: a package, so pytest imports every test module once as ``tests.<name>``.

Shared helpers live in ``tests/helpers`` and are imported one way:
``from tests.helpers import hf_fixtures``; fixtures live in ``tests/conftest.py``."""
