import pytest

from support import ProxyProcess


@pytest.fixture(params=["fastpath", "python"])
def proxy(request, tmp_path):
    """
    A portproxy twistd process in its own directory, stopped after the
    test: once with the compiled fast paths (where they are built) and once
    with the pure-Python relays, so that both stay tested.
    """
    process = ProxyProcess(tmp_path, fastPath=request.param == "fastpath")
    yield process
    process.stop()
