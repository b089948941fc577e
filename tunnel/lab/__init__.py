"""Lab: network namespaces, veth links and demo/benchmark helpers (app layer, never imported by the core)."""
