"""
End-to-end tests with a real dockerd whose userland proxy is the shim:
containers published with C{docker run -p} are served by one portproxy,
on both paths (the C{proxy} fixture).

The module starts one dockerd of its own (all its state in a temporary
directory, its bridge on 198.18.0.0/24, no iptables, no forwarding: it
touches nothing of the machine's own networking), builds a tiny local
image from busybox, and stops dockerd and deletes the bridge it created at
the end.  Traffic goes to 127.0.0.1 only.  It needs root, dockerd
(Debian's docker.io), busybox-static and a C compiler; CI installs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from support import SHIM, ProxyProcess, freePort, freeRange, portFree, waitUntil

DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = "/bin/busybox"
#: The docker.io client matches its dockerd; another one on PATH
#: negotiates the API down to it.
DOCKER = (
    "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
)
IMAGE = "local/bb"

#: A UDP echo server for the image (busybox has none).
UDP_ECHO = r"""
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    static char b[65536];
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) return 1;
    for (;;) {
        struct sockaddr_in p;
        socklen_t l = sizeof p;
        ssize_t n = recvfrom(s, b, sizeof b, 0, (struct sockaddr *)&p, &l);
        if (n >= 0) sendto(s, b, (size_t)n, 0, (struct sockaddr *)&p, l);
    }
}
"""


def _missing() -> str | None:
    """
    Why this machine cannot run dockerd for the tests, or L{None}.
    """
    if os.geteuid() != 0:
        return "dockerd needs root"
    for path in (DOCKERD, BUSYBOX):
        if not os.path.exists(path):
            return f"{path} is not installed (Debian: docker.io, busybox-static)"
    if DOCKER is None:
        return "no docker client (Debian: docker.io)"
    if shutil.which("gcc") is None:
        return "no C compiler for the image's UDP echo server"
    if not SHIM.exists():
        return f"the Docker shim is not built ({SHIM})"
    if os.path.exists("/sys/class/net/docker0"):
        return "docker0 exists: another dockerd owns the default bridge"
    return None


class Docker:
    """
    A dockerd of the tests' own, and its client.

    @ivar control: the control socket path its shims use.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.control = str(root / "control.sock")
        self.pidfile = root / "docker.pid"
        self.log = root / "dockerd.log"
        config = {
            "bip": "198.18.0.1/24",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "storage-driver": "vfs",
            "data-root": str(root / "data"),
            "exec-root": str(root / "exec"),
            "pidfile": str(self.pidfile),
            "hosts": [f"unix://{self.socket}"],
            "userland-proxy-path": str(SHIM),
        }
        import json

        (root / "daemon.json").write_text(json.dumps(config))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PORTPROXY_CONTROL=self.control)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [DOCKERD, "--config-file", str(self.root / "daemon.json")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def settled() -> bool:
            exited = self.process.poll() is not None
            return exited or self.run("version", check=False).returncode == 0

        try:
            waitUntil(settled, 60, what="dockerd answering", interval=0.2)
        except AssertionError:
            pass
        if self.run("version", check=False).returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:]
            self.stop()
            pytest.skip(f"dockerd cannot start here:\n{tail}")

    def run(self, *arguments: str, check: bool = True, input: bytes | None = None):
        result = subprocess.run(
            [DOCKER, "-H", f"unix://{self.socket}", *arguments],
            input=input,
            capture_output=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(arguments)} failed: {result.stderr.decode(errors='replace')}"
            )
        return result

    def buildImage(self) -> None:
        """
        Import C{local/bb}: busybox (httpd, nc, sh, sleep) and udpecho.
        """
        image = self.root / "image"
        (image / "bin").mkdir(parents=True)
        (image / "www").mkdir()
        (image / "www" / "index.html").write_text("hello from the container\n")
        shutil.copy(BUSYBOX, image / "bin" / "busybox")
        for name in ("httpd", "nc", "sh", "sleep"):
            os.symlink("busybox", image / "bin" / name)
        source = self.root / "udpecho.c"
        source.write_text(UDP_ECHO)
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-static",
                "-o",
                str(image / "bin" / "udpecho"),
                str(source),
            ],
            check=True,
        )
        tar = subprocess.run(
            ["tar", "-C", str(image), "-c", "."], capture_output=True, check=True
        )
        self.run("import", "-", IMAGE, input=tar.stdout)

    def removeContainers(self) -> None:
        ids = self.run("ps", "-aq").stdout.split()
        if ids:
            self.run("rm", "-f", *[i.decode() for i in ids])

    def stop(self) -> None:
        """
        Remove every container (their containerd shims would outlive
        dockerd), stop dockerd by its pid and delete the bridge it created.
        """
        if self.process is not None and self.process.poll() is None:
            try:
                self.removeContainers()
            except (AssertionError, subprocess.TimeoutExpired):
                pass
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # dockerd leaves its bridge behind when it exits.
        if os.path.exists("/sys/class/net/docker0"):
            subprocess.run(["ip", "link", "delete", "docker0"], check=False)


@pytest.fixture(scope="module")
def docker():
    """
    One dockerd for the module (only one can own docker0), with the image
    built; stopped and cleaned up after the module's last test.
    """
    missing = _missing()
    if missing:
        pytest.skip(missing)
    root = Path(tempfile.mkdtemp(prefix="ppd-"))
    daemon = Docker(root)
    try:
        daemon.start()
        daemon.buildImage()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def portproxy(proxy, docker):
    """
    A portproxy daemon on the control socket dockerd's shims use (both
    paths); the test's containers are removed afterwards.
    """
    proxy.start(f"mappings: []\ncontrol:\n  socket: {docker.control}\n")
    yield proxy
    docker.removeContainers()


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return response.read().decode()


def udpRoundTrip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recvfrom(65535)[0]


def test_dockerRunPublishesThroughPortproxy(docker, portproxy):
    """
    docker run -p publishes a TCP and a UDP port through the shim and
    portproxy, docker ps shows them, and docker stop frees them.
    """
    tcpPort, udpPort = freePort(), freePort("udp")
    docker.run(
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        f"127.0.0.1:{tcpPort}:80",
        "-p",
        f"127.0.0.1:{udpPort}:53/udp",
        IMAGE,
        "sh",
        "-c",
        "udpecho 53 & exec httpd -f -p 80 -h /www",
    )
    assert fetch(tcpPort) == "hello from the container\n"
    waitUntil(lambda: _udpAnswers(udpPort), what="UDP echo through the proxy")
    ports = docker.run("ps", "--format", "{{.Ports}}").stdout.decode()
    assert (
        f"127.0.0.1:{tcpPort}->80/tcp" in ports
        and f"127.0.0.1:{udpPort}->53/udp" in ports
    )
    portproxy.waitFor(
        rf"tcp @tcp-127.0.0.1:{tcpPort} 127.0.0.1:\d+ -> 198\.18\.0\.\d+:80 "
    )
    docker.run("stop", "-t", "1", "web")
    assert portFree(tcpPort) and portFree(udpPort, "udp")
    portproxy.waitFor(rf"\[@udp-127.0.0.1:{udpPort}\] \(unpublished\)")


def _udpAnswers(port: int) -> bool:
    try:
        return udpRoundTrip(port) == b"ping"
    except OSError:
        return False


def test_dockerPortRange(docker, portproxy):
    """
    A 100-port range is 100 shims and 100 listeners of one portproxy;
    each forwards to its own container port, and removing the container
    frees them all.
    """
    first = freeRange(100)
    last = first + 99
    docker.run(
        "run",
        "-d",
        "--name",
        "range",
        "-p",
        f"127.0.0.1:{first}-{last}:{first}-{last}",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        str(first + 50),
        "-h",
        "/www",
    )
    assert portproxy.output().count("(published)") == 100
    assert fetch(first + 50) == "hello from the container\n"
    docker.run("rm", "-f", "range")
    assert all(portFree(p) for p in range(first, last + 1))


def test_dockerPortTaken(docker, portproxy):
    """
    docker run on a port that is taken fails with portproxy's sentence
    naming the port and the reason.
    """
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        result = docker.run(
            "run",
            "-d",
            "--name",
            "taken",
            "-p",
            f"127.0.0.1:{port}:80",
            IMAGE,
            "sleep",
            "60",
            check=False,
        )
    finally:
        busy.close()
    assert result.returncode != 0
    assert (
        f"Error starting userland proxy: cannot listen on tcp 127.0.0.1:{port} for mapping"
        f" '@tcp-127.0.0.1:{port}': address already in use"
    ) in result.stderr.decode()


def test_portproxyRestartKeepsPublishedPorts(docker, portproxy, tmp_path):
    """
    Killing portproxy and starting it again: the shims publish their
    ports again within two seconds and the container answers again.
    """
    port = freePort()
    docker.run(
        "run",
        "-d",
        "--name",
        "restart",
        "-p",
        f"127.0.0.1:{port}:80",
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    )
    assert fetch(port) == "hello from the container\n"
    os.kill(portproxy.pid, signal.SIGKILL)
    portproxy.process.wait()
    again = ProxyProcess(tmp_path / "again", fastPath=portproxy.fastPath)
    again.workdir.mkdir()
    try:
        again.start(f"mappings: []\ncontrol:\n  socket: {docker.control}\n")
        again.waitFor(rf"\[@tcp-127.0.0.1:{port}\] \(published\)", timeout=2.5)
        assert fetch(port) == "hello from the container\n"
        docker.run("stop", "-t", "1", "restart")
        assert portFree(port)
    finally:
        again.stop()
