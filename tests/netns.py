"""A network of its own for tests and benchmarks: loopback only.

Tests talk only to servers they start on 127.0.0.1 (SeaweedFS, Ray). Ray's processes still
connect to each other over the machine's interface address even with ``--node-ip-address
127.0.0.1``, and libraries probe cloud metadata (169.254.169.254) by themselves; on this
workplace only loopback may be a target. So, where it can (root, Linux), the test process moves
into a network namespace of its own in which only ``lo`` exists and is up: everything it starts
inherits it and can reach nothing but this process tree's own servers. ``MODELBUILD_TEST_NETWORK=host``
keeps the host's network (e.g. to debug a server by hand).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def private_network() -> bool:
    """Move this process into a new network namespace with loopback up; False where it cannot."""
    if os.environ.get("MODELBUILD_TEST_NETWORK") == "host" or os.environ.get("MODELBUILD_TEST_NETNS") == "1":
        return os.environ.get("MODELBUILD_TEST_NETNS") == "1"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, bytes(14))
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, bytes(14)))
    os.environ["MODELBUILD_TEST_NETNS"] = "1"
    return True
