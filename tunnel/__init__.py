"""mptun: a multipath, DTLS 1.2 secured IP tunnel."""
__version__ = "0.1.0"
