"""Serving: the driver loop that owns an Engine, the clients that talk to it, and the HTTP engine host."""
