"""State behind small protocols: memory (default) and Redis. The only place that imports redis.

May import `core`; never `stages` or `net`.
"""
