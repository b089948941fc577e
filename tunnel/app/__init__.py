"""The app layer: CLI, configuration, the two daemons, certificates, control socket, metrics, status."""
