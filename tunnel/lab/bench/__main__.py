"""``python -m tunnel.lab.bench``: the benchmark, and the UDP echo sub-commands the bench starts
inside the lab's namespaces (``echo-server PORT``, ``echo-client ADDR PORT SECONDS RATE``)."""

import sys

from tunnel.lab.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
