"""trio + h11: listeners, the downstream HTTP server, the upstream client and pool, TLS.

The only package that touches streams and sockets.
"""
