"""
The processes a benchmark of bench/ starts: each in its own session, and
stopped by pid (never by name), so nothing else on the machine is touched.
"""

import os
import signal
import subprocess


class Processes:
    """
    What this run started; stopped by pid at exit.
    """

    def __init__(self):
        self.started = []

    def start(self, argv, **kw):
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        process = subprocess.Popen(argv, start_new_session=True, **kw)
        self.started.append(process)
        return process

    def stop(self, process):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stopAll(self):
        for process in reversed(self.started):
            self.stop(process)
        self.started = []
