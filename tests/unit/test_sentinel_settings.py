"""Sentinel configuration: sentinel:// broker URLs, BROKER_SENTINEL_MASTER and
BROKER_WAIT_REPLICAS, each checked with an error that names the variable."""

from __future__ import annotations

import pytest

from app.delivery import transport
from app.settings import ConfigError, load_settings, parse_sentinel_url

URL = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def test_a_sentinel_url_with_a_master_name_is_accepted_and_is_its_own_result_backend() -> None:
    settings = load_settings({"BROKER_URL": URL, "BROKER_SENTINEL_MASTER": "jobs"})

    assert settings.broker_url == URL
    assert settings.sentinel_master == "jobs"
    assert settings.result_backend == URL
    assert settings.wait_replicas == 0


def test_every_sentinel_of_the_url_is_read_with_kombus_default_port() -> None:
    parsed = parse_sentinel_url("sentinel://:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2")

    assert parsed.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (parsed.password, parsed.db) == ("s3cret", 2)


def test_a_sentinel_url_without_a_master_name_names_the_missing_variable() -> None:
    with pytest.raises(ConfigError, match="BROKER_SENTINEL_MASTER: expected the master name"):
        load_settings({"BROKER_URL": URL})


def test_a_master_name_without_a_sentinel_url_is_refused() -> None:
    with pytest.raises(ConfigError, match="BROKER_SENTINEL_MASTER: expected to be set only"):
        load_settings({"BROKER_URL": "redis://cache:6379/0", "BROKER_SENTINEL_MASTER": "jobs"})


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://10.0.0.1:26379;redis://10.0.0.2:6379",
        "sentinel://10.0.0.1:notaport",
        "sentinel://:26379",
        "sentinel://10.0.0.1:26379/zero",
        "sentinel://;;",
    ],
)
def test_a_malformed_sentinel_url_names_broker_url_and_hides_passwords(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"BROKER_URL": url.replace("//", "//:pw@", 1), "BROKER_SENTINEL_MASTER": "m"})

    assert str(raised.value).startswith("BROKER_URL: expected sentinel://host:port URLs")
    assert "pw" not in str(raised.value)


def test_a_master_name_with_spaces_is_refused() -> None:
    with pytest.raises(ConfigError, match="BROKER_SENTINEL_MASTER"):
        load_settings({"BROKER_URL": URL, "BROKER_SENTINEL_MASTER": "my master"})


def test_wait_replicas_is_read_and_checked() -> None:
    redis_url = {"BROKER_URL": "redis://cache:6379/0"}

    assert load_settings({**redis_url, "BROKER_WAIT_REPLICAS": "1"}).wait_replicas == 1
    assert (
        load_settings(
            {"BROKER_URL": URL, "BROKER_SENTINEL_MASTER": "m", "BROKER_WAIT_REPLICAS": "2"}
        ).wait_replicas
        == 2
    )
    for bad in ("-1", "one", "17"):
        with pytest.raises(ConfigError, match="BROKER_WAIT_REPLICAS: expected a whole number"):
            load_settings({**redis_url, "BROKER_WAIT_REPLICAS": bad})
    with pytest.raises(ConfigError, match="BROKER_WAIT_REPLICAS: expected a Redis"):
        load_settings({"BROKER_URL": "amqp://guest@rabbit//", "BROKER_WAIT_REPLICAS": "1"})


def test_sentinel_urls_get_the_services_sentinel_transport_not_kombus() -> None:
    # One URL: kombu would switch to a later URL of a list with kombu's own transport.
    first = "sentinel://10.0.0.1:26379"
    assert transport.broker_transport(URL) == (first, transport.SENTINEL_TRANSPORT)
    assert "sentinels" in transport.SentinelChannel.from_transport_options
    assert issubclass(transport.SentinelTransport.Channel, transport.Channel)
    assert "master_name" in transport.SentinelChannel.from_transport_options
    assert "wait_replicas" in transport.SentinelChannel.from_transport_options


def test_not_replicated_says_what_was_confirmed_and_what_to_do() -> None:
    error = transport.NotReplicated(0, 1, 1.0)

    assert "0 of the 1 replica(s) BROKER_WAIT_REPLICAS asks for" in str(error)
    assert "publish it again" in str(error)
