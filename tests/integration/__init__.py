"""Integration tests: real namespaces, bridges, nftables and processes (root only)."""
