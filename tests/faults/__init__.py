"""Fault matrices run against real daemons and real dependencies (a private redis-server)."""
