"""trio and sockets: listeners, the downstream HTTP server, the upstream client and pool, TLS,
the TCP relay, the admin listener.

The only package that touches streams and sockets.
"""
