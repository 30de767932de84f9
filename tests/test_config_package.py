"""The seams the config package is built on: sections shaped by dataclass fields, and the
rules other modules own (route globs in gateway.routes, store URLs in gateway.redis_urls,
header-name identity in gateway.models)."""

from __future__ import annotations

import pytest
import yaml

from gateway.config.schema import SchemaReader
from gateway.models import Route, Upstream, header_key
from gateway.redis_urls import check_store_url
from gateway.routes import compile_glob, glob_problem


def node(text: str) -> yaml.Node:
    return yaml.compose(text, Loader=yaml.SafeLoader)


def test_a_section_allows_the_fields_that_have_a_reader_in_declared_order() -> None:
    reader = SchemaReader("c.yaml")
    route = reader.section(node("{public: true, zzz: 1}"), "r", Route,
                           {"public": reader.boolean, "path": reader.text}, path="/")
    assert route == Route("/", public=True)
    assert reader.sorted_problems() == [
        "c.yaml:1: r.zzz: unknown key 'zzz' (allowed: path, public)"]


def test_a_reader_for_a_field_the_dataclass_lacks_is_a_programming_error() -> None:
    reader = SchemaReader("c.yaml")
    with pytest.raises(TypeError, match="Upstream has no field urls"):
        reader.section(node("{}"), "u", Upstream, {"urls": reader.text}, name="u", url="")


@pytest.mark.parametrize("glob", ["/", "/people/**", "/a/*/b", "/caf%C3%A9/", "/**",
                                  "/ids/a%3Bb/**"])
def test_globs_that_can_match_compile(glob: str) -> None:
    assert glob_problem(glob) is None
    compile_glob(glob)


@pytest.mark.parametrize("glob", ["/_keygate", "/%7Euser", "/a%2Fb", "/a/%zz",
                                  # what check_path refuses: '..' behind an encoded ';', NFKC
                                  "/a/..%3Bx/b", "/a/%EF%BC%8E%EF%BC%8E/**", "/a%EF%BC%8Fb",
                                  # its NFKC reading ('/admin/**') is never the same route
                                  "/%EF%BD%81dmin/**", "/p/Acme%E2%84%A2"])
def test_globs_that_could_never_match_are_refused(glob: str) -> None:
    assert glob_problem(glob) is not None


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h", "unix:///run/r.sock",
                                 "redis+sentinel://h:26379/mymaster",
                                 "redis+cluster://a:7000,b:7001"])
def test_store_urls_a_client_can_use(url: str) -> None:
    check_store_url(url)


@pytest.mark.parametrize("url, words", [
    ("http://h", "must be embedded or a URL"), ("redis://h/x", "database number"),
    ("redis:///0", "needs a host"), ("unix://", "socket path"),
    ("redis://h/0?db=x", "Invalid value for 'db'"),
    # a timeout the per-request client could not keep (nan never times out, inf neither)
    ("redis://h/0?socket_timeout=nan", "socket_timeout"),
    ("redis://h/0?socket_timeout=inf", "socket_timeout"),
    ("redis://h/0?socket_connect_timeout=0", "socket_connect_timeout"),
    ("redis://h/0?socket_timeout=-1", "socket_timeout"),
])
def test_store_urls_no_client_could_use(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_store_url(url)


@pytest.mark.parametrize("url", ["redis://app:2024/hunter2@h:6379/0",
                                 "rediss://app:2024/hunter2@h/0",
                                 "unix://app:2024/hunter2@/run/r.sock",
                                 "unix://app:2024/hunter2@/run/r.sock?db=1",
                                 # a '?' in it: the rest read as a query (taken as an
                                 # unknown option, or dropped), a '#': as a fragment
                                 "redis://app:2024?hunter2@h:6379/0",
                                 "redis://app:2024?hunter2=x@h:6379/0",
                                 "unix://app:2024?hunter2&x@/run/r.sock",
                                 "redis://app:2024#hunter2@h:6379/0"])
def test_a_password_with_an_unencoded_slash_is_refused_and_never_shown(url: str) -> None:
    """A password with a '/' that was not percent-encoded, after digits only ('2024/...'),
    reads as a port and a path: redis:// was refused quoting the path, the rest of the
    password ("got '/hunter2@h:6379/0'"); unix:// was accepted as a socket path named after
    it, and the start-up error then printed the whole URL, password and all (redact finds no
    user info). Both are refused with what to percent-encode, and no part of the password."""
    with pytest.raises(ValueError) as refused:
        check_store_url(url)
    assert "percent-encode" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "2024" not in str(refused.value)


@pytest.mark.parametrize("url", [
    "redis+sentinel://:pw@s1/m?sentinel_password=hunter2&hunter3",
    "redis+sentinel://s1/m?sentinel_password=hunter2&hunter3=x",
    "rediss+cluster://n1:7000?ssl_password=hunter2&hunter3=x",
    "redis://h:6379/0?password=hunter2&hunter3=x",
    "unix:///run/r.sock?db=1&password=hunter2&hunter3=x",
    "rediss://h/0?ssl_password=hunter2&ssl_hunter3=x"])
def test_a_password_option_with_an_unencoded_ampersand_is_never_shown(url: str) -> None:
    """A password given in the query (password=, sentinel_password=, ssl_password=) with an
    '&' that was not percent-encoded splits into the option and a name made of the rest of the
    password, which was refused quoting it: "unknown query parameter 'hunter3'". With a
    password option in the query, an unknown name is refused without being quoted."""
    with pytest.raises(ValueError) as refused:
        check_store_url(url)
    assert "hunter3" not in str(refused.value) and "%26" in str(refused.value), \
        str(refused.value)


@pytest.mark.parametrize("url", ["unix:///run/r.sock?db=1&password=p@ss",
                                 "redis://h:6379/0?client_name=a@b",
                                 "unix:///run/a%40b.sock",
                                 "redis+sentinel://s1/m?sentinel_password=p@ss",
                                 "redis+sentinel://:a%2Fb%3Fc@s1/m%40x/2"])
def test_an_at_sign_where_it_belongs_is_accepted(url: str) -> None:
    check_store_url(url)


@pytest.mark.parametrize("option", [
    # objects a connection takes, that a URL can only give as text
    "retry=x", "connection_class=x", "credential_provider=x", "retry_on_error=x",
    "socket_keepalive_options=x", "redis_connect_func=x", "encoder_class=x", "parser_class=x",
    "event_dispatcher=x", "driver_info=x", "socket_type=1",
    # the URL's own parts, and what keygate's clients read their replies with
    "port=6380", "encoding=utf-16", "encoding_errors=ignore", "decode_responses=false"])
@pytest.mark.parametrize("base", ["redis://h:6379/0?", "rediss://h/0?", "unix:///r.sock?db=1&"])
def test_store_url_options_that_cannot_work_are_refused(base: str, option: str) -> None:
    """Every name a connection's constructor takes passed the check, though a URL gives each
    as text: ?retry=x made ``config check`` and ``serve`` die with a traceback
    (AttributeError: 'str' object has no attribute 'update_supported_errors'),
    ?connection_class=x likewise, ?encoding=utf-16 sent a garbled HELLO and
    ?socket_keepalive_options=x failed every connection. They are refused, by name."""
    name = option.split("=")[0]
    with pytest.raises(ValueError) as refused:
        check_store_url(base + option)
    assert repr(name) in str(refused.value), str(refused.value)


@pytest.mark.parametrize("query", [
    "protocol=3", "client_name=kg&lib_name=kg&lib_version=1", "health_check_interval=10",
    "retry_on_timeout=true", "socket_keepalive=true", "max_connections=8", "timeout=3",
    "socket_timeout=1&socket_connect_timeout=1", "socket_read_size=65536",
    "username=app&password=pw", "db=3"])
def test_store_url_options_redis_py_reads_are_accepted(query: str) -> None:
    check_store_url("redis://h:6379/0?" + query)
    if "keepalive" not in query:  # a TCP option
        check_store_url("unix:///r.sock?" + query)


def test_header_identity_ignores_case_and_reads_underscore_as_dash() -> None:
    assert header_key("X_Workspace_Id") == header_key("x-workspace-id") == "x-workspace-id"
    # lighttpd's CGI, FastCGI and SCGI read every punctuation character as "_"
    assert header_key("X.Workspace.Id") == header_key("x+workspace~id") == "x-workspace-id"
