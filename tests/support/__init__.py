"""Test infrastructure shared by the end-to-end tests: a scriptable fake upstream, clients, TLS.

Test-only code: trio, h11 and trustme are fine here; nothing in `resilient_ambassador` may
import this package.
"""
