"""one-tproxy: OpenNebula's transparent proxies, rebuilt on Twisted.

Guests on isolated virtual networks reach management services (OneGate first
of all) at 169.254.16.9; each hypervisor carries those TCP connections from a
per-bridge network namespace into its own stack over one multiplexed UNIX
socket per bridge.
"""

__version__ = "0.1.0"
