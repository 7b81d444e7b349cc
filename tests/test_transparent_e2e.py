"""
End-to-end test of C{client_address: transparent} in network namespaces the
test creates: a client namespace, a proxy namespace running twistd with
the policy routing of docs/client-address.md, and a backend namespace whose
servers answer with the address they saw.  Every address lives inside these
namespaces (198.18.0.0/24), and the namespaces are deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from support import ProxyProcess

CLIENT, PROXY_IN, PROXY_OUT, BACKEND = (
    "198.18.0.2",
    "198.18.0.1",
    "198.18.0.65",
    "198.18.0.66",
)
TCP_PORT, UDP_PORT = 7000, 7001

BACKEND_SCRIPT = textwrap.dedent(f"""\
    import socket, threading
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("{BACKEND}", {TCP_PORT})); t.listen(16)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("{BACKEND}", {UDP_PORT}))
    def udp():
        while True:
            data, peer = u.recvfrom(65535)
            u.sendto(peer[0].encode(), peer)
    threading.Thread(target=udp, daemon=True).start()
    print("ready", flush=True)
    while True:
        c, peer = t.accept()
        c.sendall(peer[0].encode()); c.close()
""")

CLIENT_SCRIPT = textwrap.dedent(f"""\
    import socket, sys
    with socket.create_connection(("{PROXY_IN}", 8000), timeout=10) as c:
        tcp = c.recv(100).decode()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
    for attempt in range(10):
        u.sendto(b"who", ("{PROXY_IN}", 8001))
        try:
            udp = u.recv(100).decode(); break
        except socket.timeout:
            udp = None
    print(tcp, udp)
""")


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def canMakeNamespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return None


@pytest.fixture
def namespaces():
    """
    Three namespaces joined by two veth pairs, with the proxy namespace's
    policy routing; deleted afterwards.
    """
    why = canMakeNamespaces()
    if why is not None:
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    client, proxy, backend = f"ppc{tag}", f"ppp{tag}", f"ppb{tag}"
    made = []
    try:
        for ns in (client, proxy, backend):
            run("ip", "netns", "add", ns)
            made.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # Created inside the proxy namespace, then one end moved: nothing
        # ever exists in the root namespace.
        run(
            "ip",
            "-n",
            proxy,
            "link",
            "add",
            "vc",
            "type",
            "veth",
            "peer",
            "name",
            "vpc",
        )
        run("ip", "-n", proxy, "link", "set", "vc", "netns", client)
        run(
            "ip",
            "-n",
            proxy,
            "link",
            "add",
            "vb",
            "type",
            "veth",
            "peer",
            "name",
            "vpb",
        )
        run("ip", "-n", proxy, "link", "set", "vb", "netns", backend)
        for ns, dev, address in (
            (client, "vc", f"{CLIENT}/26"),
            (proxy, "vpc", f"{PROXY_IN}/26"),
            (proxy, "vpb", f"{PROXY_OUT}/26"),
            (backend, "vb", f"{BACKEND}/26"),
        ):
            run("ip", "-n", ns, "addr", "add", address, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", client, "route", "add", "default", "via", PROXY_IN)
        run("ip", "-n", backend, "route", "add", "default", "via", PROXY_OUT)
        # docs/client-address.md: the backend's replies to a client's
        # address are delivered to the proxy's own sockets.
        for proto, port in (("tcp", TCP_PORT), ("udp", UDP_PORT)):
            run(
                "ip",
                "-n",
                proxy,
                "rule",
                "add",
                "iif",
                "vpb",
                "ipproto",
                proto,
                "sport",
                str(port),
                "lookup",
                "100",
            )
        run(
            "ip",
            "-n",
            proxy,
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        )
        yield client, proxy, backend
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("fastPath", [True, False], ids=["fastpath", "python"])
def test_backendSeesClientAddress(namespaces, tmp_path, fastPath):
    """
    Through a transparent mapping, TCP and UDP, the backend sees the
    client's own address and its answers reach the client.
    """
    client, proxyNs, backend = namespaces
    server = subprocess.Popen(
        ["ip", "netns", "exec", backend, sys.executable, "-c", BACKEND_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
    )
    proxy = ProxyProcess(tmp_path, fastPath, prefix=("ip", "netns", "exec", proxyNs))
    try:
        assert server.stdout.readline().strip() == "ready"
        proxy.start(
            "defaults:\n  client_address: transparent\n"
            "mappings:\n"
            f"  - {{name: t, listen: '{PROXY_IN}:8000', target: '{BACKEND}:{TCP_PORT}'}}\n"
            f"  - {{name: u, proto: udp, listen: '{PROXY_IN}:8001', target: '{BACKEND}:{UDP_PORT}'}}\n"
        )
        seen = subprocess.run(
            ["ip", "netns", "exec", client, sys.executable, "-c", CLIENT_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert seen.stdout.split() == [CLIENT, CLIENT], (seen.stderr, proxy.output())
        proxy.waitFor(rf"tcp t {CLIENT}:\d+ -> {BACKEND}:{TCP_PORT} ")
    finally:
        proxy.stop()
        server.kill()
        server.wait()
