"""cachedit test suite; `tests.models` holds the tiny diffusers models every test uses."""
