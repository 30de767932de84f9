"""keygate: an authenticating reverse proxy for API keys."""

# The one place the version is written: pyproject.toml reads it (dynamic), /metrics exports it
# (keygate_build_info), the OpenAPI document and `keygate --version` show it; CHANGELOG.md and
# deploy/k8s's image tag follow it (tests/test_release.py).
__version__ = "0.2.0"
