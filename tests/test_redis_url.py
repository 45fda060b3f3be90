"""``REDIS_URL``'s forms for a Redis Cluster and for Sentinel
(`detached_runs.backends.redis_url`): what each names, and a clear
`ValueError` for anything malformed, never another exception."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detached_runs.backends.redis_url import RedisTarget, parse_redis_url


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/2?ssl_cert_reqs=none", "unix:///tmp/r.s"]
)
def test_a_url_of_one_server_is_left_to_redis_py(url):
    assert parse_redis_url(url) == RedisTarget("server", url)


def test_a_cluster_url_names_its_startup_nodes_with_6379_by_default():
    target = parse_redis_url("redis+cluster://a:7000,b,[::1]:7002/")
    assert target.kind == "cluster"
    assert target.nodes == (("a", 7000), ("b", 6379), ("::1", 7002))
    assert (target.username, target.password, target.ssl) == (None, None, False)


def test_a_cluster_url_carries_a_percent_encoded_user_and_password_and_tls():
    target = parse_redis_url("rediss+cluster://app:p%40ss%3Aw@h:7000")
    assert (target.username, target.password, target.ssl) == ("app", "p@ss:w", True)
    assert parse_redis_url("redis+cluster://:secret@h").password == "secret"


def test_a_sentinel_url_names_the_sentinels_the_master_and_its_database():
    target = parse_redis_url("redis+sentinel://s1,s2:26380/mymaster/2")
    assert target.kind == "sentinel"
    assert target.nodes == (("s1", 26379), ("s2", 26380))
    assert (target.service, target.db) == ("mymaster", 2)
    assert parse_redis_url("redis+sentinel://s/m/").db == 0
    assert parse_redis_url("redis+sentinel://s/my%40master").service == "my@master"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:6379", "known scheme"),
        ("127.0.0.1:6379", "known scheme"),
        ("redis+cluster://", "an address is empty"),
        ("redis+cluster://a,,b", "an address is empty"),
        ("redis+cluster://h:0", "from 1 to 65535"),
        ("redis+cluster://h:65536", "from 1 to 65535"),
        ("redis+cluster://h:port", "is not a host[:port]"),
        ("redis+cluster://h/3", "one database, 0"),
        ("redis+cluster://h?socket_timeout=1", "connection_kwargs"),
        ("redis+sentinel://s:26379", "name of the master"),
        ("redis+sentinel://s:26379//0", "name of the master"),
        ("redis+sentinel://s/mymaster/one", "whole number"),
        ("redis+sentinel://s/mymaster/0/x", "whole number"),
        ("redis+sentinel://s/my@master/0", "percent-encode"),
        ("redis://127.0.0.1:notaport/0", "from 1 to 65535"),
        ("rediss://h:70000", "from 1 to 65535"),
        ("redis://127.0.0.1:6379/abc", "is not a number"),
        ("redis://h/0/1", "is not a number"),
    ],
)
def test_a_malformed_url_is_refused_with_what_is_wrong_and_the_form_expected(url, says):
    with pytest.raises(ValueError, match="REDIS_URL") as refused:
        parse_redis_url(url)
    assert says in str(refused.value)


def test_a_refusal_does_not_show_the_password():
    with pytest.raises(ValueError) as refused:
        parse_redis_url("redis+cluster://app:hunter2@h:99999")
    assert "hunter2" not in str(refused.value) and "app:***@h" in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        # A '/' of the password, not percent-encoded: the rest was read as the path.
        "redis+cluster://app:hunter2/x@h:7000/",
        "redis+sentinel://app:hunter2/x@s/mymaster/0",
        # And before a '?': the query is refused.
        "redis+cluster://app:hunter2/x?y@h/",
        # No scheme, or a scheme with one slash: all of it was shown.
        "app:hunter2@redis.internal:6379",
        "redis:/app:hunter2@h",
    ],
)
def test_a_refusal_does_not_show_a_password_that_is_not_percent_encoded(url):
    with pytest.raises(ValueError, match="REDIS_URL") as refused:
        parse_redis_url(url)
    assert "hunter2" not in str(refused.value)


@given(
    st.sampled_from(["redis+cluster://", "rediss+sentinel://", "redis:/", ""]),
    st.text(max_size=20),
    st.sampled_from(["h:7000/", "h/mymaster/1", "h:99999/", "h?x=1"]),
)
def test_no_refusal_shows_any_of_a_raw_password(scheme, secret, rest):
    url = f"{scheme}app:Zq9{secret}@{rest}"
    try:
        parse_redis_url(url)
    except ValueError as exc:
        assert "Zq9" not in str(exc)


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:s3cret@h:6379/0",
        "redis+cluster://app:s3cret@h1,h2/",
        "redis+sentinel://:s3cret@s/m/0",
    ],
)
def test_the_repr_of_what_a_url_names_does_not_show_its_password(url):
    target = parse_redis_url(url)
    assert "s3cret" not in repr(target) and "s3cret" not in str(target)
    assert target.url == url


def test_a_url_that_is_not_a_string_is_refused():
    with pytest.raises(ValueError, match="must be a string"):
        parse_redis_url(None)


@given(st.text())
def test_any_text_is_read_or_refused_with_a_value_error(text):
    for scheme in ("", "redis+cluster://", "redis+sentinel://", "rediss+cluster://"):
        try:
            target = parse_redis_url(scheme + text)
        except ValueError as exc:
            assert "REDIS_URL" in str(exc)
            continue
        for host, port in target.nodes:
            assert host and 1 <= port <= 65535


HOSTS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,2}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
)
ADDRESSES = st.lists(st.tuples(HOSTS, st.integers(1, 65535)), min_size=1, max_size=5)
SECRETS = st.one_of(st.none(), st.text(min_size=1, max_size=20))


@given(ADDRESSES, SECRETS, st.booleans())
def test_a_well_formed_cluster_url_gives_back_its_parts(addresses, password, tls):
    userinfo = "" if password is None else f"app:{quote(password, safe='')}@"
    hosts = ",".join(f"{host}:{port}" for host, port in addresses)
    target = parse_redis_url(f"redis{'s' if tls else ''}+cluster://{userinfo}{hosts}/")
    assert target.nodes == tuple((host.strip("[]"), port) for host, port in addresses)
    assert target.password == password and target.ssl is tls


@given(ADDRESSES, st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True), st.integers(0, 15))
def test_a_well_formed_sentinel_url_gives_back_its_parts(addresses, service, db):
    hosts = ",".join(f"{host}:{port}" for host, port in addresses)
    target = parse_redis_url(f"redis+sentinel://{hosts}/{service}/{db}")
    assert target.nodes == tuple((host.strip("[]"), port) for host, port in addresses)
    assert (target.service, target.db) == (service, db)
