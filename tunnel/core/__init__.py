"""The sans-IO core: paths, the tunnel engine, both roles' state machines, and the parts they use.

Plain classes that take bytes, events and ``now`` and return actions; no sockets, clocks or logging.
"""
