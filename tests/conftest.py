import pytest

from support import ProxyProcess


@pytest.fixture
def proxy(tmp_path):
    """
    A portproxy twistd process in its own directory, stopped after the
    test.
    """
    process = ProxyProcess(tmp_path)
    yield process
    process.stop()
