"""Pure protocol and policy logic: config model, messages, header rules, limits.

Stdlib only. Nothing here does I/O, sleeps or reads the clock: decisions take `now` as an
argument. Must not import trio, redis or anything from `net`, `stages` or `stores`.
"""
