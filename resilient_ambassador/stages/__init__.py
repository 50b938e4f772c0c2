"""Async policy wrappers (tracing, cache, retry, rate limit, breaker), one per concern.

Each stage wraps an inner `Handler`; none touches a socket. May import `core` and `stores`,
never `net`.
"""
