"""Path sanity, keys in the query string and route matching (gateway.routes, pure)."""

from __future__ import annotations

import pytest

from gateway.config import Route
from gateway.errors import BadRequest, NotFound
from gateway.routes import (RouteTable, check_path, compile_glob, glob_meet, glob_problem,
                            query_has_token)
from gateway.tokens import make_token
from hypothesis import given, settings, strategies as st

# --- check_path ----------------------------------------------------------------------------------

GOOD_PATHS = [
    "/",
    "/people",
    "/people/",
    "/people/123",
    "/people/123/",
    "/people/a%20b",
    "/people/a%20", "/people/%20a", "/a.%20b/x", "/people/x.%20",  # a name, spaces aside
    "/caf%C3%A9",
    "/caf%c3%a9",                 # lower-case hex in a needed escape: accepted
    "/a%3Bb",                     # encoded ';' is data, not a segment parameter
    "/a%25",                      # a literal '%'
    "/a%25zz",                    # '%25' not followed by two hex digits
    "/a%3F%23",                   # encoded '?' and '#'
    "/.well-known/openid-configuration",
    "/a..b/.c/d.",
    "/v1/users/@me:sub!$&'()*+,=",
    "/~user/file-name_1.txt",
    "/" + "a" * 2047,
    # encoded ';' inside a segment that is more than a dot segment once the parameter is cut
    "/ids/x%3By", "/a/..x%3B", "/a/x..%3B..",
    # NFKC changes these but into nothing that is path syntax
    "/%EF%BC%A1",                 # FULLWIDTH A
    "/a/%C2%BD",                  # VULGAR FRACTION ONE HALF: '1\u20442' (fraction slash)
    "/a%E2%88%95b",               # DIVISION SLASH: not '/' under NFKC
    "/%E3%83%86%E3%82%B9%E3%83%88",
]

BAD_PATHS = {
    # dot segments, raw and encoded in any case
    "dot-raw": ["/.", "/./", "/a/./b", "/a/.", "/..", "/../", "/a/../b", "/a/.."],
    # segments of dots only, any number of them: Windows (IIS, its file APIs) strips a
    # segment's trailing dots, so '...' reads as an empty segment there
    "dots-only": ["/...", "/a/.../b", "/a/....", "/..../x", "/a/...%3Bx", "/%E2%80%A6",
                  "/a/%E2%80%A6/b", "/a/.%E2%80%A6", "/a/%E2%80%A6%3Bx"],
    # ... and of dots and spaces only: Windows strips trailing spaces too, so '..%20' reads
    # as '..' ('/public/..%20/admin' is '/admin' to IIS) and '%20' or '.%20' as empty; also
    # once an encoded ';' parameter is cut off, or NFKC made the space (an ideographic one)
    "dots-spaces": ["/public/..%20/admin", "/a/..%20", "/a/.%20/b", "/%20/admin", "/a/%20",
                    "/a/%20%20/b", "/a/.%20.%20/b", "/a/%20../b", "/a/..%20%3Bx/b",
                    "/a/..%E3%80%80/b", "/a/%20%3Bx"],
    "dot-enc": ["/%2e", "/%2E", "/a/%2e%2e/b", "/a/%2E%2e/b", "/a/.%2e/b", "/a/%2e./b",
                "/a/%2e%2E", "/%2e%2e/etc/passwd", "/a%2eb"],
    "slash-enc": ["/a%2Fb", "/a%2fb", "/public/..%2Fadmin", "/%2F"],
    "backslash": ["/a%5Cb", "/a%5cb", "/a\\b", "/\\", "/a/..\\b"],
    "empty-seg": ["//", "//a", "/a//b", "/a//", "/a/b//"],
    "semicolon": ["/a;b", "/a;", "/;/a", "/admin;x=1/users", "/a/b;jsessionid=1"],
    "nul": ["/a\x00b", "/a%00b", "/%00"],
    "control": ["/a\tb", "/a\nb", "/a\rb", "/a\x7fb", "/a%0Ab", "/a%0d", "/a%7F", "/a%1f"],
    "space": ["/a b", "/ ", "/a/ /b"],
    "double": ["/%252e", "/%252E%252e", "/a%252Fb", "/a%2541", "/a%25ff"],
    "unreserved-enc": ["/%41", "/%5A", "/%5a", "/%61dmin", "/%7A", "/%7a", "/%30", "/%39",
                       "/%2D", "/%2d", "/%5F", "/%5f", "/%7E", "/%7e", "/people/%31"],
    "malformed": ["/%zz", "/%4", "/%", "/a%g1", "/a%1", "/a%%41"],
    "non-ascii": ["/caf\u00e9", "/\u00ff", "/\udcc3\udca9", "/a\u2028"],
    "no-slash": ["", "a", "people", "*", "http://example.com/a"],
    "too-long": ["/" + "a" * 2048, "/a" * 1025],
    # a dot segment behind an encoded ';' parameter (the '..;/' bypass of servers that decode
    # %3B and cut the parameter off), and a segment that is nothing but such a parameter
    "semicolon-enc": ["/public/..%3B/admin", "/public/..%3bjsessionid=x/admin", "/a/.%3B/b",
                      "/a/..%3B", "/..%3Bx=1/a", "/a/.%3b", "/a/%3B/b", "/%3Bjsessionid=1/a"],
    # compatibility forms that NFKC turns into path syntax
    "nfkc": ["/a/%EF%BC%8E%EF%BC%8E/b", "/a/%EF%BC%8E/b", "/a/.%EF%BC%8E/b",
             "/public/%ef%bc%8e%ef%bc%8e", "/a%EF%BC%8Fb", "/public/..%EF%BC%8Fadmin",
             "/a%EF%BC%BCb", "/a%EF%B9%A8b", "/a/%E2%80%A5/b", "/%E2%80%A4%E2%80%A4/x",
             "/a/%EF%B9%92%EF%B9%92/b", "/a/%EF%B8%B0/b", "/%E2%84%80", "/x/%E2%84%85",
             "/a%EF%BC%9Bx/b", "/a%EF%B9%94", "/%EF%BC%852e%EF%BC%852e/x",
             "/a/%EF%BC%8E%EF%BC%8E%3Bx/b", "/a/..%EF%BC%9B/b"],
    "other-chars": ["/a#b", "/a?b", "/a\"b", "/a<b", "/a>b", "/a{b}", "/a|b", "/a^b", "/a`b",
                    "/a[b]"],
}


@pytest.mark.parametrize("path", GOOD_PATHS)
def test_canonical_paths_pass(path: str) -> None:
    check_path(path)


@pytest.mark.parametrize("path", [p for ps in BAD_PATHS.values() for p in ps])
def test_non_canonical_paths_are_bad_path(path: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_path(path)
    err = info.value
    assert err.code == "bad_path" and err.status == 400
    assert err.message.startswith("The request path") and err.message.endswith(".")


@pytest.mark.parametrize("path, words", [
    ("/a/../b", "'..' segment"),
    ("/a/.../b", "segment of dots only"),
    ("/a/%E2%80%A6/b", "NFKC"),
    ("/a/%2e%2e/b", "percent-encoded dot"),
    ("/a/..%20/b", "dots and spaces only"),
    ("/a%2Fb", "encoded '/'"),
    ("/a%5cb", "encoded '\\'"),
    ("/a\\b", "backslash"),
    ("/a//b", "empty segment"),
    ("/a;b", "';'"),
    ("/a%00b", "NUL"),
    ("/a\x00b", "NUL"),
    ("/a b", "space"),
    ("/%252e", "double-encoded"),
    ("/%61dmin", "percent-encoded 'a'"),
    ("/%zz", "malformed percent escape"),
    ("/caf\u00e9", "non-ASCII"),
    ("/public/..%3B/admin", "'..' once its encoded ';' parameter"),
    ("/a/.%3bx/b", "'.' once its encoded ';' parameter"),
    ("/a/%3Bx/b", "empty once its encoded ';' parameter"),
    ("/a/%EF%BC%8E%EF%BC%8E/b", "NFKC"),
    ("/a%EF%BC%8Fb", "turns into '/'"),
    ("/a%EF%BC%BCb", "turns into '\\'"),
    ("people", "must start with '/'"),
    ("/" + "a" * 3000, "longer than 2048"),
])
def test_bad_path_messages_say_what_is_wrong(path: str, words: str) -> None:
    with pytest.raises(BadRequest) as info:
        check_path(path)
    assert words in info.value.message


_READ_AS_SYNTAX = st.sampled_from(["\uff0e", "\uff0f", "\uff3c", "\u2024", "\u2025", "\ufe52",
                                   "\ufe68", "\u2100", "\uff1b", "\uff05", ";", ".", "x",
                                   "\u00e9", "\uff21", " ", "\u3000"])


@given(st.lists(st.text(_READ_AS_SYNTAX, min_size=1, max_size=4), min_size=1, max_size=3))
def test_a_path_accepted_reads_the_same_to_a_server_that_normalises_and_cuts_parameters(segs):
    """Whatever a server that percent-decodes, NFKC-normalises and cuts ';' parameters off
    makes of an accepted path, it is the same segments, none of them a dot segment."""
    from urllib.parse import quote
    import unicodedata
    path = "/" + "/".join(quote(seg, safe="") for seg in segs)
    try:
        check_path(path)
    except BadRequest as exc:
        assert exc.code == "bad_path"
        return
    for seg in segs:
        read = unicodedata.normalize("NFKC", seg)
        assert "/" not in read and "\\" not in read, path
        assert read.partition(";")[0] not in ("", ".", ".."), path
        # nor one of dots and spaces only, which Windows reads as '..', '.' or empty
        assert read.partition(";")[0].strip(". ") != "", path


def test_check_path_accepts_raw_bytes() -> None:
    check_path(b"/people/a%20b")
    with pytest.raises(BadRequest):
        check_path(b"/caf\xc3\xa9")
    with pytest.raises(BadRequest):
        check_path(b"/a/%2e%2e/b")


def test_bad_path_response_is_spec_json() -> None:
    with pytest.raises(BadRequest) as info:
        check_path("/a/../b")
    import json
    body = json.loads(info.value.body("rid-1"))
    assert body["error"]["code"] == "bad_path" and body["error"]["request_id"] == "rid-1"


# --- query_has_token -----------------------------------------------------------------------------

TOKEN, _ = make_token("kg", "live")
TEST_TOKEN, _ = make_token("kg", "test")
OTHER_PREFIX, _ = make_token("zz", "live")
BROKEN = TOKEN[:-1] + ("A" if TOKEN[-1] != "A" else "B")   # checksum no longer matches


@pytest.mark.parametrize("query", [
    f"api_key={TOKEN}",
    f"a=1&key={TOKEN}&b=2",
    f"{TOKEN}",
    f"{TOKEN}=x",
    f"key={TEST_TOKEN}",
    f"auth=Bearer%20{TOKEN}",
    f"auth=Bearer+{TOKEN}",
    f"auth=bearer {TOKEN}",
    f"k=%6Bg_live_{TOKEN[8:]}",                       # percent-encoded prefix
    f"k=%256Bg_live_{TOKEN[8:]}",                     # double-encoded prefix
    f"x=1;k={TOKEN}",
    f"json=%7B%22key%22%3A%22{TOKEN}%22%7D",
])
def test_query_with_token_is_detected(query: str) -> None:
    assert query_has_token(query, "kg")


@pytest.mark.parametrize("query", [
    "",
    "a=1&b=2",
    f"key={BROKEN}",
    f"key={TOKEN[:-3]}",
    f"key={OTHER_PREFIX}",
    "key=kg_live_" + "a" * 50,
    "q=%2F&x=1",
    "q=%zz",
])
def test_query_without_token_passes(query: str) -> None:
    assert not query_has_token(query, "kg")


def test_query_token_other_prefix() -> None:
    assert query_has_token(f"k={OTHER_PREFIX}", "zz")
    assert not query_has_token(f"k={TOKEN}", "zz")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("%%%2aA5fFgz+ .\u00e9\u20ac\x00"), max_size=40))
def test_the_fast_percent_decoders_read_what_urllib_reads(text) -> None:
    # gateway.percent stands in for urllib's unquote (latin-1 and UTF-8) and unquote_plus on
    # request text, which were slow on stray '%' signs: the same result for any text
    from urllib.parse import unquote, unquote_plus as urllib_unquote_plus
    from gateway.percent import unquote_latin1, unquote_plus, unquote_utf8
    assert unquote_latin1(text) == unquote(text, encoding="latin-1")
    assert unquote_utf8(text) == unquote(text)
    assert unquote_plus(text) == urllib_unquote_plus(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("%%%%%2aA5fFgz+\u20ac"), min_size=257, max_size=600))
def test_the_fast_percent_decoders_read_long_texts_dense_in_percent_signs_as_urllib(text) -> None:
    # a long text mostly of '%' signs is checked for escapes in one pass before the regex
    # (a hostile query): the same result, escape or not, non-latin-1 characters or not
    from urllib.parse import unquote
    from gateway.percent import unquote_latin1, unquote_utf8
    assert unquote_latin1(text) == unquote(text, encoding="latin-1")
    assert unquote_utf8(text) == unquote(text)


def test_a_token_double_encoded_behind_stray_percent_signs_is_still_found() -> None:
    encoded = "".join(f"%25{b:02X}" for b in TOKEN.encode())
    assert query_has_token("%%%&x=" + encoded, "kg")
    assert query_has_token("%" * 5000 + "&x=%25" + encoded[3:] + "+%", "kg")
    assert not query_has_token("%" * 5000 + "%25" * 3000, "kg")


# --- route matching ------------------------------------------------------------------------------

def table(*routes: Route) -> RouteTable:
    return RouteTable(routes)


def r(path: str, *methods: str, upstream: str = "api", public: bool = False) -> Route:
    return Route(path=path, upstream=upstream, methods=tuple(methods), public=public)


def no_route(t: RouteTable, method: str, path: str) -> None:
    with pytest.raises(NotFound) as info:
        t.match(method, path)
    assert info.value.code == "no_route" and info.value.status == 404
    assert info.value.message == f"No route matches {method} {path}."


def test_exact_path_and_trailing_slash() -> None:
    people = r("/people")
    t = table(people)
    assert t.match("GET", "/people") is people
    no_route(t, "GET", "/people/")
    no_route(t, "GET", "/people/1")
    no_route(t, "GET", "/peoplex")
    no_route(t, "GET", "/")
    slash = r("/people/")
    t = table(slash)
    assert t.match("GET", "/people/") is slash
    no_route(t, "GET", "/people")


def test_double_star_matches_zero_or_more_segments() -> None:
    rest = r("/people/**")
    t = table(rest)
    for path in ("/people", "/people/", "/people/1", "/people/1/", "/people/1/friends/2"):
        assert t.match("GET", path) is rest, path
    no_route(t, "GET", "/peoplex")
    no_route(t, "GET", "/peoplex/1")
    no_route(t, "GET", "/other/people")
    no_route(t, "GET", "/")


def test_people_vs_people_rest_first_match_wins() -> None:
    exact, rest = r("/people", "GET"), r("/people/**")
    t = table(exact, rest)
    assert t.match("GET", "/people") is exact
    assert t.match("POST", "/people") is rest
    assert t.match("GET", "/people/1") is rest
    t2 = table(rest, exact)
    assert t2.match("GET", "/people") is rest


def test_single_star_is_exactly_one_nonempty_segment() -> None:
    one = r("/people/*")
    t = table(one)
    assert t.match("GET", "/people/1") is one
    assert t.match("GET", "/people/a%20b") is one
    no_route(t, "GET", "/people")
    no_route(t, "GET", "/people/")
    no_route(t, "GET", "/people/1/")
    no_route(t, "GET", "/people/1/2")
    mid = r("/people/*/friends")
    t = table(mid)
    assert t.match("GET", "/people/7/friends") is mid
    no_route(t, "GET", "/people/friends")
    no_route(t, "GET", "/people/7/8/friends")


def test_root_and_catch_all() -> None:
    root, every = r("/"), r("/**")
    t = table(root, every)
    assert t.match("GET", "/") is root
    assert t.match("GET", "/anything/at/all") is every
    t = table(every, root)
    assert t.match("GET", "/") is every
    star = r("/*/items")
    t = table(r("/a/x"), star)
    assert t.match("GET", "/b/items") is star
    assert t.match("GET", "/a/items") is star


def test_methods() -> None:
    read, write, anym = r("/p/**", "GET"), r("/p/**", "POST", "PUT"), r("/p/**")
    t = table(read, write, anym)
    assert t.match("GET", "/p/1") is read
    assert t.match("HEAD", "/p/1") is read          # GET routes answer HEAD too
    assert t.match("POST", "/p/1") is write
    assert t.match("PUT", "/p/1") is write
    assert t.match("DELETE", "/p/1") is anym
    t = table(read, write)
    no_route(t, "DELETE", "/p/1")
    no_route(t, "get", "/p/1")                      # methods are case-sensitive on the wire
    assert table(r("/x", "get")).match("GET", "/x").path == "/x"   # config case is normalised


def test_case_sensitive_and_raw_segments() -> None:
    t = table(r("/People"), r("/caf%C3%A9"))
    assert t.match("GET", "/People").path == "/People"
    no_route(t, "GET", "/people")
    assert t.match("GET", "/caf%C3%A9").path == "/caf%C3%A9"
    # literal segments compare raw, but an escape's hex in either case: check_path accepts
    # '%c3%a9', and the upstream decodes it to the glob's bytes
    assert t.match("GET", "/caf%c3%a9").path == "/caf%C3%A9"
    no_route(t, "GET", "/cafe%CC%81")               # another spelling of the name: not it
    no_route(t, "GET", "/PEOPLE")


def test_first_match_in_file_order_across_index_buckets() -> None:
    routes = [r("/a/b", "GET", upstream="u1"), r("/*/b", upstream="u2"),
              r("/a/**", upstream="u3"), r("/**", upstream="u4")]
    t = RouteTable(routes)
    assert t.match("GET", "/a/b").upstream == "u1"
    assert t.match("POST", "/a/b").upstream == "u2"
    assert t.match("POST", "/z/b").upstream == "u2"
    assert t.match("GET", "/a/c").upstream == "u3"
    assert t.match("GET", "/z/c").upstream == "u4"
    assert t.match("GET", "/").upstream == "u4"


def test_glob_characters_are_literal_inside_segments_and_regex_safe() -> None:
    t = table(r("/v1.0/a+b/(x)"))
    assert t.match("GET", "/v1.0/a+b/(x)").path == "/v1.0/a+b/(x)"
    no_route(t, "GET", "/v1x0/a+b/(x)")
    assert compile_glob("/files/*.json").fullmatch("/files/*.json")
    assert not compile_glob("/files/*.json").fullmatch("/files/a.json")


def test_double_star_must_be_last() -> None:
    with pytest.raises(ValueError):
        RouteTable([r("/a/**/b")])
    with pytest.raises(ValueError):
        RouteTable([r("a/b")])


def test_empty_table() -> None:
    no_route(RouteTable([]), "GET", "/")



_ROUTES = (Route("/people/**", "api", ("GET",), ("people:read",)),
           Route("/people", "api", ("POST",), ("people:write",)),
           Route("/*/stats", "api", (), ("stats:read",)),
           Route("/v1/chat/completions", "llm", ("POST",), ("chat",)))


@given(st.lists(st.tuples(st.sampled_from(["GET", "HEAD", "POST", "PUT", "get"]),
                          st.sampled_from(["/people", "/people/1", "/people/1/x", "/v1/stats",
                                           "/people/stats", "/v1/chat/completions",
                                           "/v1/chat/completions/x", "/", "/other"])),
                max_size=20))
def test_a_remembered_match_is_the_match(requests):
    """The table remembers the route each (method, path) matched; asked again, in any order
    and mix, it answers what a fresh table answers, and still refuses what matches nothing."""
    remembering = RouteTable(_ROUTES)
    for method, path in requests + requests:
        try:
            expected = RouteTable(_ROUTES).match(method, path)
        except NotFound:
            with pytest.raises(NotFound):
                remembering.match(method, path)
        else:
            assert remembering.match(method, path) is expected


# --- a path whose case-insensitive reading is another route --------------------------------------
# Many upstreams match paths case-insensitively (IIS/ASP.NET, Windows file servers, some Spring
# and Express configs): behind a public catch-all, '/ADMIN/users' matched the catch-all here and
# the upstream served the scoped /admin/users without a key.

def _bad_path(t: RouteTable, method: str, path: str) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        t.match(method, path)
    assert info.value.code == "bad_path" and info.value.status == 400
    assert path.strip("/").split("/")[0].lower() not in info.value.message.lower()  # no echo
    return info.value


ADMIN, PUBLIC = r("/admin/**"), r("/**", public=True)


@pytest.mark.parametrize("path", ["/ADMIN/users", "/Admin/users", "/aDmin/users", "/ADMIN",
                                  "/Admin/", "/ADMIN/USERS/1"])
def test_a_path_another_route_matches_case_insensitively_is_bad_path(path: str) -> None:
    error = _bad_path(table(ADMIN, PUBLIC), "GET", path)
    assert "case-insensitive" in error.message


@pytest.mark.parametrize("routes, path, expected", [
    ((ADMIN, PUBLIC), "/admin/USERS", 0),              # the same route either way
    ((ADMIN, PUBLIC), "/public/ADMIN", 1),
    ((ADMIN, PUBLIC), "/Administrator", 1),            # no route but the catch-all folds to it
    ((r("/files/*"),), "/files/AbC123", 0),
    ((PUBLIC, ADMIN), "/ADMIN/users", 0),              # the catch-all comes first either way
    ((r("/people/*"), PUBLIC), "/people/AbC", 0),
    ((r("/people/me"), r("/people/*")), "/people/Me2", 1),
])
def test_a_path_whose_case_insensitive_reading_is_the_same_route_passes(routes, path,
                                                                        expected) -> None:
    assert table(*routes).match("GET", path) is routes[expected]


def test_a_later_glob_that_folds_onto_an_earlier_literal_is_bad_path() -> None:
    me, one = r("/people/me", "GET"), r("/people/*")
    t = table(me, one)
    _bad_path(t, "GET", "/people/ME")                  # a case-insensitive upstream: /people/me
    assert t.match("POST", "/people/ME") is one        # the /people/me route takes no POST
    assert t.match("GET", "/people/Me2") is one


def test_no_route_as_sent_stays_no_route() -> None:
    no_route(table(ADMIN), "GET", "/ADMIN/users")
    no_route(table(r("/people/me")), "GET", "/people/ME")


def test_an_upper_case_glob_is_another_route_to_a_lower_case_path() -> None:
    admin = r("/Admin/**")
    t = table(admin, PUBLIC)
    assert t.match("GET", "/Admin/users") is admin
    _bad_path(t, "GET", "/admin/users")
    _bad_path(t, "GET", "/ADMIN/users")
    assert t.match("GET", "/public/x") is PUBLIC


def test_case_insensitive_readings_only_count_routes_for_the_method() -> None:
    delete, get = r("/admin/**", "DELETE"), r("/reports/**", "GET")
    t = table(delete, get, PUBLIC)
    assert t.match("GET", "/ADMIN/x") is PUBLIC        # the admin route takes no GET
    _bad_path(t, "DELETE", "/ADMIN/x")
    _bad_path(t, "HEAD", "/Reports/1")                 # GET routes answer HEAD too
    assert t.match("POST", "/Reports/1") is PUBLIC


def test_case_insensitive_readings_of_escapes_and_of_nfkc_readings() -> None:
    cafe = r("/caf%C3%A9/**")
    t = table(cafe, PUBLIC)
    assert t.match("GET", "/caf%c3%a9/menu") is cafe   # hex case was never a difference
    _bad_path(t, "GET", "/CAF%C3%A9/menu")
    # FULLWIDTH LATIN CAPITAL A: NFKC reads '/Admin/users', which a case-insensitive
    # upstream serves as /admin/users
    t = table(ADMIN, PUBLIC)
    _bad_path(t, "GET", "/%EF%BC%A1dmin/users")
    assert t.match("GET", "/public/%EF%BC%A1dmin") is PUBLIC


def test_a_refused_path_is_refused_every_time_and_an_accepted_one_remembered() -> None:
    t = table(ADMIN, PUBLIC)
    for _ in range(3):
        _bad_path(t, "GET", "/ADMIN/users")
        assert t.match("GET", "/admin/users") is ADMIN
        assert t.match("GET", "/people/AbC") is PUBLIC


# --- a path whose reading without a segment's trailing dots or its last segment's suffix is ----
# --- another route --------------------------------------------------------------------------------
# Windows and IIS strip a segment's trailing dots ('/admin./users' is '/admin/users' to them);
# Rails routes take '/admin.json' for '/admin' with format json, as Spring MVC's suffix pattern
# matching did by default before 5.3. With '/admin/**' scoped and a public '/**', those paths
# matched the public catch-all here and reached the admin endpoint upstream without a key.

@pytest.mark.parametrize("path", ["/admin.", "/admin./users", "/admin../users", "/admin.json",
                                  "/admin.json.x", "/ADMIN.", "/Admin.json", "/admin%20/users",
                                  "/admin.%20./users", "/admin%20"])
def test_a_path_another_route_matches_without_trailing_dots_or_its_suffix_is_bad_path(path):
    t = table(ADMIN, PUBLIC)
    for _ in range(2):  # refused every time, not remembered as the route it matched
        error = _bad_path(t, "GET", path)
        assert "trailing dots or spaces" in error.message
    assert t.match("GET", "/admin/users") is ADMIN


# NTFS names a directory's index stream 'admin::$INDEX_ALLOCATION' (or 'admin:$I30:$INDEX_
# ALLOCATION') and a file's data 'report::$DATA': to a server on Windows that maps the path to
# files (IIS, and any static or script handler there) they are 'admin' and 'report', the
# classic IIS directory-authentication bypass. '/admin::$INDEX_ALLOCATION/users' matched the
# public catch-all here and was served as '/admin/users' without a key.
@pytest.mark.parametrize("path", ["/admin::$INDEX_ALLOCATION/users",
                                  "/admin:$i30:$index_allocation/users",
                                  "/admin::$Index_Allocation", "/admin%3A%3A%24INDEX_ALLOCATION/x",
                                  "/admin%3a%3a$INDEX_ALLOCATION/x", "/admin.::$INDEX_ALLOCATION/x",
                                  "/admin::$INDEX_ALLOCATION./x", "/ADMIN::$INDEX_ALLOCATION/x"])
def test_a_path_another_route_matches_without_an_ntfs_stream_name_is_bad_path(path) -> None:
    t = table(ADMIN, PUBLIC)
    for _ in range(2):
        error = _bad_path(t, "GET", path)
        assert "NTFS" in error.message and "admin" not in error.message.lower()
    report = r("/files/report")
    t = table(report, PUBLIC)
    _bad_path(t, "GET", "/files/report::$DATA")
    _bad_path(t, "GET", "/files/report%3A%3A%24data")
    # a ':' that names no such stream, or a reading that is the same route, passes
    for ok in ("/files/report:export", "/files/report::x", "/v1/jobs/a:cancel",
               "/files/other::$DATA"):
        assert t.match("GET", ok) is PUBLIC
    assert table(ADMIN, PUBLIC).match("GET", "/admin/x::$DATA") is ADMIN


@pytest.mark.parametrize("routes, path, expected", [
    ((ADMIN, PUBLIC), "/admin/users.json", 0),        # '/admin/users' is the same route
    ((ADMIN, PUBLIC), "/admin/users.", 0),
    ((ADMIN, PUBLIC), "/files/report.pdf", 1),        # '/files/report': the same route
    ((ADMIN, PUBLIC), "/a.b/c", 1),                   # a dot inside a segment but the last
    ((ADMIN, PUBLIC), "/people/a%20b", 1),            # a space inside a segment
    ((r("/users.csv"), r("/users"), PUBLIC), "/users.csv", 0),  # a route names it as sent
    ((r("/v1/*/export.csv"), r("/v1/*/export")), "/v1/x/export.csv", 0),
    ((r("/people/*"), PUBLIC), "/people/.hidden", 0),  # no name before the dot: no suffix
])
def test_a_path_whose_dotless_reading_is_the_same_route_or_named_literally_passes(
        routes, path, expected) -> None:
    assert table(*routes).match("GET", path) is routes[expected]


@pytest.mark.parametrize("path", ["/admin.json/", "/admin./", "/admin%20/", "/ADMIN.json/",
                                  "/admin.%20/"])
def test_a_dotted_reading_with_a_trailing_slash_is_read_without_it_too(path) -> None:
    # Rails drops the trailing slash and then the format ('/admin.json/' is '/admin'), IIS
    # strips the dots and routes '/admin/' as '/admin': each reading alone ('/admin.json',
    # '/admin/') matched the public catch-all, and so did the path
    admin = r("/admin")
    t = table(admin, PUBLIC)
    for _ in range(2):
        _bad_path(t, "GET", path)
    assert t.match("GET", "/admin") is admin


@pytest.mark.parametrize("path", ["/admin./openapi.json", "/admin%20/openapi.json",
                                  "/Admin./openapi.json"])
def test_a_route_naming_the_dotted_last_segment_still_reads_the_other_segments(path) -> None:
    # '/*/openapi.json' names the last segment literally: that spares the format reading
    # ('/admin/openapi'), not IIS's reading of the segments before it ('/admin/openapi.json',
    # under the scoped '/admin/**' that comes first)
    t = table(ADMIN, r("/*/openapi.json", public=True))
    _bad_path(t, "GET", path)
    assert t.match("GET", "/admin/openapi.json") is ADMIN
    assert t.match("GET", "/docs/openapi.json").path == "/*/openapi.json"


@pytest.mark.parametrize("routes, path", [
    ((ADMIN, PUBLIC), "/admin%EF%BC%8E/users"),       # FULLWIDTH FULL STOP: '/admin./users'
    ((ADMIN, PUBLIC), "/admin%E3%80%80/users"),       # IDEOGRAPHIC SPACE: '/admin /users'
    ((ADMIN, PUBLIC), "/admin.%EF%BC%8E/users"),
    ((r("/admin"), PUBLIC), "/admin%EF%BC%8Ejson"),   # '/admin.json'
])
def test_a_path_whose_nfkc_reading_has_a_dotted_reading_of_another_route_is_bad_path(
        routes, path) -> None:
    # an upstream that NFKC-normalises the path and strips trailing dots and spaces (IIS) or
    # cuts a format off serves the scoped '/admin' route: the NFKC reading ('/admin./users')
    # matched the public catch-all as the path did, and only the path had dotted readings
    t = table(*routes)
    for _ in range(2):
        _bad_path(t, "GET", path)


def test_a_glob_segment_of_dots_only_is_a_problem() -> None:
    assert "'...'" in glob_problem("/a/.../b")
    for glob in ("/a/..%20/b", "/a/%20", "/.%20/x"):  # refused as requests: never matches
        assert "dots and spaces only" in glob_problem(glob)
    assert glob_problem("/a/b%20/c") is None and glob_problem("/a/x.%20") is None


# --- a path whose reading without its trailing slash is another route ---------------------------
# Most upstream routers take '/people/1/' for '/people/1' (Express and Spring MVC 5 by default,
# Django's APPEND_SLASH the other way round, Flask's strict_slashes=False): with DELETE on
# '/people/*' scoped people:delete and '/people/**' taking every write under people:write, a key
# without people:delete sent 'DELETE /people/1/', matched '/people/**' here, and the upstream
# deleted person 1.

@pytest.mark.parametrize("path", ["/people/1/", "/people/ME/"])
def test_a_path_another_route_matches_without_its_trailing_slash_is_bad_path(path) -> None:
    delete, write = r("/people/*", "DELETE"), r("/people/**", "POST", "PUT", "DELETE")
    t = table(r("/people/me", "DELETE"), delete, write)
    for _ in range(2):  # refused every time, not remembered as the route it matched
        error = _bad_path(t, "DELETE", path)
        assert "trailing slash" in error.message
    assert t.match("DELETE", "/people/1") is delete
    assert t.match("DELETE", "/people/1/x") is write
    admin = r("/admin", "GET")
    t = table(admin, PUBLIC)
    _bad_path(t, "GET", "/admin/")
    _bad_path(t, "GET", "/ADMIN/")                     # and read case-insensitively too
    assert t.match("GET", "/admin") is admin


@pytest.mark.parametrize("routes, path, expected", [
    ((ADMIN, PUBLIC), "/admin/", 0),                   # '/admin/**' is '/admin' too
    ((r("/people/*"), r("/people/**", "POST")), "/people/1/", None),  # GET: no route as sent
    ((r("/people/*", "DELETE"), r("/people/**")), "/people/1/", 1),   # GET: not the DELETE one
    ((r("/docs/"),), "/docs/", 0),                     # nothing matches '/docs'
    ((r("/"), PUBLIC), "/", 0),                        # the root has no slash to drop
])
def test_a_path_whose_reading_without_its_trailing_slash_is_the_same_route_passes(
        routes, path, expected) -> None:
    if expected is None:
        with pytest.raises(NotFound):
            table(*routes).match("GET", path)
    else:
        assert table(*routes).match("GET", path) is routes[expected]


_CASE_GLOBS = ["/admin/**", "/Admin/x", "/people/*", "/people/me", "/*/stats", "/**",
               "/files/*", "/caf%C3%A9/**", "/a/B/*", "/", "/People/"]
_CASE_FIRST = ["admin", "Admin", "ADMIN", "people", "People", "files", "FILES", "caf%C3%A9",
               "CAF%c3%a9", "a", "A", "x"]
_CASE_WORDS = ["me", "ME", "Me", "stats", "Stats", "x", "X", "b", "B", "1", "AbC123", "users"]


def _first(routes, method: str, path: str, fold: bool):
    """The first route whose methods and glob fit, the glob compared case-insensitively
    (ASCII) when ``fold``: the reference the table must agree with."""
    import re
    for route in routes:
        methods = {m for m in route.methods} | ({"HEAD"} if "GET" in route.methods else set())
        regex = compile_glob(route.path)
        if fold:
            regex = re.compile(regex.pattern, re.IGNORECASE | re.ASCII)
        if (not route.methods or method in methods) and regex.fullmatch(path):
            return route
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_CASE_GLOBS),
                          st.sampled_from([(), (), ("GET",), ("POST",), ("GET", "DELETE")])),
                min_size=1, max_size=6),
       st.sampled_from([None, "/**", "/*/**", "/*"]),
       st.lists(st.tuples(st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
                          st.lists(st.sampled_from(_CASE_FIRST), max_size=1),
                          st.lists(st.sampled_from(_CASE_WORDS), max_size=2),
                          st.booleans()), min_size=1, max_size=10))
def test_refused_exactly_when_the_case_insensitive_first_match_is_another_route(globs, last,
                                                                                 requests):
    """Against a reference (the first route whose glob fits, compared with and without ASCII
    case): refused exactly when the two differ, and never when the path's lower-cased form
    matches the route it matches as sent (all globs lower-case)."""
    globs = globs + ([(last, ())] if last else [])
    routes = [Route(path=g, upstream="api", methods=m) for g, m in globs]
    t = RouteTable(routes)
    for method, first, rest, slash in requests:
        words = first + rest
        path = "/" + "/".join(words) + ("/" if slash and words else "")
        sent, folded = _first(routes, method, path, False), _first(routes, method, path, True)
        # without its trailing slash, as sent and compared case-insensitively
        bare = path[:-1] if len(path) > 1 and path.endswith("/") else None
        bare_sent = bare and _first(routes, method, bare, False)
        bare_folded = bare and _first(routes, method, bare, True)
        at = [id(route) for route in routes].index
        slash_rival = sent is not None and (bare_sent not in (None, sent) or bool(
            bare_folded and at(id(bare_folded)) < at(id(sent))))
        if sent is None:
            with pytest.raises(NotFound):
                t.match(method, path)
        elif folded is not sent or slash_rival:
            _bad_path_any(t, method, path)
        else:
            assert t.match(method, path) is sent
        lower = _first(routes, method, path.lower(), False)
        if sent is not None and lower is sent and not slash_rival and \
                all(g == g.lower() for g, _ in globs):
            assert t.match(method, path) is sent    # its lower-cased form is the same route


def _bad_path_any(t: RouteTable, method: str, path: str) -> None:
    with pytest.raises(BadRequest) as info:
        t.match(method, path)
    assert info.value.code == "bad_path"


def test_building_a_large_table_is_not_quadratic_in_regex_compiles(monkeypatch) -> None:
    # RouteTable is built in the event loop on every reload: with routes of both shapes, each
    # '/*/bN/**' could share a path with every earlier '/aN/**', and one combined regex of all
    # of them compiled per route took 8 s for 1000 routes (43 s for 2000; 0.1 s before).
    # Counted, not timed: the regexes compiled, and the length of what was compiled.
    import re as re_module
    import gateway.routes as routes_module
    compiled = []
    real = re_module.compile

    def counting(pattern, *args, **kwargs):
        compiled.append(len(pattern))
        return real(pattern, *args, **kwargs)
    monkeypatch.setattr(routes_module.re, "compile", counting)
    routes = [r(f"/a{i}/**") if i % 2 else r(f"/*/b{i}/**") for i in range(1000)]
    routes.append(r("/**", public=True))
    t = RouteTable(routes)
    monkeypatch.undo()
    assert len(compiled) <= 3 * len(routes) and sum(compiled) <= 200 * len(routes), \
        (len(compiled), sum(compiled))
    _bad_path(t, "GET", "/A1/x")
    _bad_path(t, "GET", "/x/B998/y")
    assert t.match("GET", "/a999/x") is routes[999]
    assert t.match("GET", "/x/b998/y") is routes[998]
    assert t.match("GET", "/x/y") is routes[-1]


@pytest.mark.parametrize("a, b, meet", [
    ("/admin/**", "/**", "/admin/**"),
    ("/**", "/admin/**", "/admin/**"),
    ("/admin/*", "/*/users", "/admin/users"),
    ("/admin/**", "/admin", "/admin"),          # '/admin/**' matches '/admin' too
    ("/admin/**", "/admin/", "/admin/"),
    ("/a/*/c/**", "/a/b/**", "/a/b/c/**"),
    ("/caf%c3%a9/*", "/caf%C3%A9/x", "/caf%C3%A9/x"),
    ("/admin/**", "/administrators/**", None),
    ("/admin/*", "/*/users/*", None),
    ("/*", "/", None),                          # '*' is a non-empty segment
    ("/people/*", "/people/", None),
    ("/people", "/people/", None),
])
def test_glob_meet_is_the_glob_of_the_paths_both_match(a, b, meet) -> None:
    """The config check's overlap of two route globs (the verb-tampering warning): checked
    against the matcher itself on sample paths."""
    assert glob_meet(a, b) == meet
    samples = ["/", "/admin", "/admin/", "/admin/users", "/admin/users/1", "/x/users",
               "/administrators/1", "/people", "/people/", "/people/1", "/a/b/c", "/a/b/c/d",
               "/a/b", "/caf%C3%A9/x", "/caf%c3%a9/x"]
    both = [s for s in samples if compile_glob(a).fullmatch(s) and compile_glob(b).fullmatch(s)]
    if meet is None:
        assert both == []
    else:
        assert both == [s for s in samples if compile_glob(meet).fullmatch(s)]


def test_the_verb_check_index_finds_exactly_the_globs_a_glob_meets() -> None:
    """fall_throughs finds a keyed route's public routes through an index of their globs
    (comparing every pair made 5000 routes take seconds to load): it must miss none that
    glob_meet says overlap, '**', '*', trailing slashes and escapes included, nor find one
    that does not."""
    import itertools
    import random
    from gateway.routes import _Budget, _GlobIndex, _upper_escapes
    segs = ["a", "b", "*", "", "%c3%a9", "%C3%A9"]
    globs = set()
    for depth in range(1, 4):
        for combo in itertools.product(segs, repeat=depth):
            if "" in combo[:-1]:
                continue
            globs.add("/" + "/".join(combo))
            globs.add("/" + "/".join(combo[:-1] + ("**",)))
    every = sorted(globs)
    for seed in range(8):  # sparse indexes: a branch the walk skips must be one to skip
        rand = random.Random(seed)
        globs = rand.sample(every, 30)
        index = _GlobIndex()
        for i, glob in enumerate(globs):
            index.add(i, _upper_escapes(glob).split("/")[1:])
        for glob in rand.sample(every, 60) + ["/**", "/*/**", "/a/", "/*/a", "/*/*/a"]:
            found = set(index.meeting(_upper_escapes(glob).split("/")[1:], _Budget(10 ** 6)))
            assert found == {i for i, g in enumerate(globs)
                             if glob_meet(glob, g) is not None}, (glob, globs)
