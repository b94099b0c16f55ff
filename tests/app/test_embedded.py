"""The embedded Redis of the one-command start: persistence and single ownership."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from app.embedded import EmbeddedRedis, EmbeddedRedisError


def test_data_survive_a_restart_through_the_append_only_file(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.xadd("stream", {"job": "a"})
        client.close()
    assert (tmp_path / "appendonly.aof").stat().st_size > 0
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert client.xlen("stream") == 1
        assert client.info("persistence")["aof_enabled"] == 1
        client.close()


def test_a_second_server_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path), pytest.raises(EmbeddedRedisError, match="already listens"):
        EmbeddedRedis(tmp_path).start()


def test_a_too_long_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="too long"):
        EmbeddedRedis(tmp_path / ("x" * 120))
