from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from tether.agent import settings as agent_settings
from tether.errors import ConfigError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent_settings.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_and_derived_values() -> None:
    s = agent_settings.load(_args(), {"TETHER_PLANE_URL": "https://plane.example/", "TETHER_TOKEN": "t"})
    assert s.plane_url == "https://plane.example"
    assert s.execution_api_url == "https://plane.example/execution/"
    assert s.queues == ("default",)
    assert s.slots == 4
    assert s.drain_timeout == timedelta(seconds=540)
    assert s.task_nice == 10
    assert s.warm_start is True


def test_warm_start_can_be_turned_off() -> None:
    env = {"TETHER_PLANE_URL": "https://plane.example", "TETHER_TOKEN": "t", "TETHER_WARM_START": "false"}
    assert agent_settings.load(_args(), env).warm_start is False
    with pytest.raises(ConfigError, match="warm-start"):
        agent_settings.load(_args("--warm-start", "sometimes"), env)


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("plane_url: https://from-file\nslots: 2\nqueues: [a, b]\nname: file-name\n")
    env = {"TETHER_CONFIG": str(config), "TETHER_SLOTS": "3", "TETHER_TOKEN": "t"}
    s = agent_settings.load(_args("--name", "flag-name"), env)
    assert (s.name, s.slots, s.queues, s.plane_url) == ("flag-name", 3, ("a", "b"), "https://from-file")


def test_token_file_is_read(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tether_0123456789_secret\n")
    token.chmod(0o600)
    s = agent_settings.load(_args("--plane-url", "https://p", "--token-file", str(token)), {})
    assert s.token == "tether_0123456789_secret"
    assert "secret" not in str(s.redacted())
    assert "secret" not in repr(s)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ((), {"TETHER_TOKEN": "t"}, "plane URL is required"),
        (("--plane-url", "ftp://x"), {"TETHER_TOKEN": "t"}, "must be an http(s) URL"),
        (("--plane-url", "https://p"), {}, "exactly one agent token source"),
        (
            ("--plane-url", "https://p", "--token", "t", "--token-file", "/f"),
            {},
            "exactly one agent token source",
        ),
        (
            ("--plane-url", "https://p", "--token-file", "/nonexistent/token"),
            {},
            "cannot read the agent token file",
        ),
        (
            ("--plane-url", "https://p", "--token", "t", "--slots", "0"),
            {},
            "--slots / TETHER_SLOTS: '0' is invalid",
        ),
        (("--plane-url", "https://p", "--token", "t", "--slots", "many"), {}, "--slots / TETHER_SLOTS"),
        (("--plane-url", "https://p", "--token", "t", "--labels", "nokey"), {}, "is not key=value"),
        (
            ("--plane-url", "https://p", "--token", "t", "--ca-bundle", "/no/ca.pem"),
            {},
            "no file at /no/ca.pem",
        ),
        (("--plane-url", "https://p", "--token", "t", "--log-level", "LOUD"), {}, "--log-level"),
        (("--plane-url", "https://p", "--token", "t", "--task-nice", "20"), {}, "must be from 0 to 19"),
        (("--plane-url", "https://p", "--token", "t"), {"TETHER_TASK_NICE": "-1"}, "--task-nice / TETHER_TASK_NICE"),
        (("--plane-url", "https://p", "--token", "t", "--queues", " , "), {}, "at least one queue"),
    ],
)
def test_bad_settings_fail_with_one_sentence_naming_the_option(
    argv: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        agent_settings.load(_args(*argv), env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("plane_url: http://p\ntoken: t\nslotz: 3\n")
    with pytest.raises(ConfigError, match="unknown options: slotz"):
        agent_settings.load(_args("--config", str(config)), {})


def test_every_option_has_one_flag_and_one_env_name() -> None:
    flags = [o.flag for o in agent_settings.OPTIONS]
    envs = [o.env for o in agent_settings.OPTIONS]
    assert len(set(flags)) == len(flags) and len(set(envs)) == len(envs)
    for option in agent_settings.OPTIONS:
        assert option.env == "TETHER_" + option.flag[2:].replace("-", "_").upper()


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_a_token_file_others_may_read_or_change_is_refused_with_the_chmod(tmp_path: Path, mode: int) -> None:
    token = tmp_path / "token"
    token.write_text("tether_0123456789_secret\n")
    token.chmod(mode)
    with pytest.raises(ConfigError, match=f"may be read or changed by other users .mode {mode:04o}.: run chmod 600"):
        agent_settings.load(_args("--plane-url", "https://p", "--token-file", str(token)), {})


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o440, 0o640])
def test_a_token_file_only_its_owner_and_group_may_read_is_taken(tmp_path: Path, mode: int) -> None:
    token = tmp_path / "token"
    token.write_text("tether_0123456789_secret\n")
    token.chmod(mode)
    assert agent_settings.load(_args("--plane-url", "https://p", "--token-file", str(token)), {}).token


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080", "http://127.5.0.1", "https://p"]
)
def test_plain_http_is_taken_to_this_machine_only(url: str) -> None:
    settings = agent_settings.load(_args("--plane-url", url, "--token", "t"), {})
    assert not agent_settings.insecure_plane_url(settings)


@pytest.mark.parametrize("url", ["http://airflow.example.com", "http://10.0.0.5:8080", "http://localhost.evil.com"])
def test_plain_http_across_a_network_is_refused_unless_allowed(url: str) -> None:
    with pytest.raises(ConfigError, match="is plain HTTP, so the agent token would cross the network in the clear"):
        agent_settings.load(_args("--plane-url", url, "--token", "t"), {})
    allowed = agent_settings.load(_args("--plane-url", url, "--token", "t"), {"TETHER_ALLOW_INSECURE_HTTP": "true"})
    assert agent_settings.insecure_plane_url(allowed)
