"""Shimmy for the gateway: how to start the real binary, and a protocol-faithful emulator of its HTTP API."""
