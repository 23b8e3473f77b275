"""Compatibility alias: the Redis backend moved to :mod:`specproxy.registry.redis`."""

from specproxy.registry.redis import RedisRegistry

__all__ = ["RedisRegistry"]
