"""twistd plugin: ``twistd one-tproxy`` runs the root proxy."""

from twisted.application.service import ServiceMaker

one_tproxy = ServiceMaker(
    "one-tproxy",
    "tproxy.tap",
    "OpenNebula transparent proxy: the root proxy of this hypervisor",
    "one-tproxy",
)
