"""Session-wide fixtures: the real Redis topologies (tests/stores/redis_topologies.py)."""

pytest_plugins = ["tests.stores.redis_topologies"]
