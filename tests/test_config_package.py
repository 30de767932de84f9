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
    ("http://h", "must be 'embedded' or a URL"), ("redis://h/x", "database number"),
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


def test_header_identity_ignores_case_and_reads_underscore_as_dash() -> None:
    assert header_key("X_Workspace_Id") == header_key("x-workspace-id") == "x-workspace-id"
