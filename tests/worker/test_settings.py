"""Settings from the environment: names, parsing, validation, documentation."""

from __future__ import annotations

import pydantic
import pytest

from worker.settings import Settings, load_settings


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/3")
    monkeypatch.setenv("INFLUENCE_KEY_PREFIX", "mine:")
    monkeypatch.setenv("INFLUENCE_API_KEYS", "k1:alice, k2:bob")
    monkeypatch.setenv("INFLUENCE_LEASE_SECONDS", "12")
    settings = Settings()
    assert settings.redis_url == "redis://example:6379/3" and settings.key_prefix == "mine:"
    assert settings.api_keys == {"k1": "alice", "k2": "bob"}
    assert settings.lease_seconds == 12.0
    monkeypatch.setenv("INFLUENCE_API_KEYS", '{"k3": "carol"}')
    assert Settings().api_keys == {"k3": "carol"}


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"INFLUENCE_API_KEYS": "no-tenant"}, "key:tenant"),
        ({"INFLUENCE_HEARTBEAT_SECONDS": "40"}, "heartbeat_seconds"),
        ({"INFLUENCE_WORKER_SEEN_SECONDS": "4"}, "below worker_seen_seconds"),
        ({"INFLUENCE_MAX_ATTEMPTS": "0"}, "max_attempts"),
        ({"INFLUENCE_MAX_TEST_POINTS": "1000"}, "max_test_points"),  # lowers, cannot raise
    ],
)
def test_bad_settings_name_the_field(monkeypatch: pytest.MonkeyPatch, env: dict, match: str):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(pydantic.ValidationError, match=match):
        Settings()


def test_every_setting_is_documented() -> None:
    assert all(field.description for field in Settings.model_fields.values())


@pytest.mark.parametrize(
    "value", ["secret-one:alice,secret-two", '{"secret-one": "alice", "secret-two": 3}']
)
def test_a_malformed_api_key_entry_is_reported_by_position_only(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("INFLUENCE_API_KEYS", value)
    with pytest.raises(pydantic.ValidationError, match="entry #2") as error:
        Settings()
    assert "secret" not in str(error.value) and "alice" not in str(error.value)


def test_load_settings_names_each_bad_variable_without_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``serve`` and ``worker`` print instead of a pydantic traceback."""
    monkeypatch.setenv("INFLUENCE_API_KEYS", "secret-one:alice,secret-two")
    monkeypatch.setenv("INFLUENCE_MAX_TEST_POINTS", "1000")
    with pytest.raises(ValueError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith("invalid settings:")
    assert "INFLUENCE_API_KEYS: " in message and "entry #2" in message
    assert "INFLUENCE_MAX_TEST_POINTS: " in message and "256" in message
    assert "secret" not in message and "alice" not in message and "1000" not in message
    assert "Traceback" not in message and "pydantic" not in message
