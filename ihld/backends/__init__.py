"""Inference backends: one client per server kind, behind the protocol in ``base``."""
