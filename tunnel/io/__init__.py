"""The I/O shell: the event loop, UDP sockets, the TUN device, netlink; it feeds the core and runs its actions."""
