"""The verify-only configs in docs/verify/ that no binary here can run (Traefik, Envoy,
ingress-nginx): they parse, point at the verify endpoint, and carry keygate's header names."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.config import IdentityHeaders, KeysConfig
from gateway.proxying.headers import AUTH_USER, FROM_PROXIES, HOST_OVERRIDE

DOCS = Path(__file__).resolve().parent.parent / "docs" / "verify"
IDENTITY = IdentityHeaders().names()
# The forwarding headers an edge proxy in front of the API must not pass on from a client
# (keygate's own proxy drops every X-Forwarded-* and Forwarded from an untrusted peer, and
# X-Real-IP with CLIENT_ADDRESS) unless it sets them itself: the host APIs build links from,
# the address they log, limit and allow by, the scheme, port and mount point of their URLs
FORWARDING = {"x-forwarded-host", "forwarded", "x-real-ip", "x-forwarded-port",
              "x-forwarded-prefix", "x-forwarded-scheme", "x-forwarded-ssl"}
# Every header keygate's own proxy drops from an untrusted peer that an edge proxy in front of
# the API passes on unless told otherwise: gateway's own list (client-address, path, host and
# auth-proxy user headers, FROM_PROXIES) and the X-Forwarded-* APIs read (keygate drops them
# all, by prefix), X-Forwarded-Uri/-Method among them (the original request as Traefik and the
# nginx examples hand it to keygate, which some APIs read too). Each example clears these or
# sets them itself from the connection; derived from gateway's list, so they cannot drift.
FROM_CLIENTS = frozenset(FROM_PROXIES | FORWARDING | {
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-uri", "x-forwarded-method",
    # a client certificate as a hop in front hands it on (Envoy's XFCC, Traefik's
    # passTLSClientCert), which an API takes as mTLS identity
    "x-forwarded-client-cert", "x-forwarded-tls-client-cert",
    "x-forwarded-tls-client-cert-info"})
# ... and what each proxy sets itself at the edge, replacing a client's copy
SET_BY = {
    "nginx.conf": {"x-forwarded-for", "x-real-ip", "x-forwarded-host", "x-forwarded-proto",
                   "x-forwarded-port"},
    # the controller's own proxy_set_header lines (use-forwarded-headers off; X-Scheme too,
    # from the connection's scheme, as X-Forwarded-Proto); it also writes
    # X-Original-Forwarded-For from the client's X-Forwarded-For, which a snippet cannot clear
    # (a second proxy_set_header of a name does not replace the first): the example says so
    "ingress-nginx.yaml": {"x-forwarded-for", "x-real-ip", "x-forwarded-host",
                           "x-forwarded-proto", "x-forwarded-port", "x-original-forwarded-for",
                           "x-scheme"},
    # use_remote_address
    "envoy.yaml": {"x-forwarded-for", "x-forwarded-proto"},
    # forwardedHeaders with no trusted IPs replace these (X-Forwarded-Uri/-Method it only
    # deletes: the example clears them too, for an entrypoint that trusts its peers)
    "traefik-compose.yml": {"x-forwarded-for", "x-real-ip", "x-forwarded-host",
                            "x-forwarded-proto", "x-forwarded-port", "x-forwarded-server"},
}


def nginx_location_headers(text: str, commented: bool = False) -> dict[str, str]:
    """proxy_set_header name (lower case) -> value, of nginx.conf's ``location /`` (or of
    the commented ingress-nginx snippet)."""
    import re
    if not commented:
        text = text.split("    location / {", 1)[1].split("\n    }", 1)[0]
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if commented:
            line = line.lstrip("#").strip()
        m = re.fullmatch(r"proxy_set_header\s+(\S+)\s+(.*);", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def traefik_cleaned() -> set[str]:
    """The names keygate-clean removes (an empty customrequestheaders value), as spelled."""
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    prefix = "traefik.http.middlewares.keygate-clean.headers.customrequestheaders."
    return {k[len(prefix):] for k, v in labels.items() if k.startswith(prefix) and v == ""}


def envoy_removed() -> set[str]:
    hcm = yaml.safe_load(text_of("envoy.yaml"))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    return {m["remove"] for m in hcm["http_filters"][0]["typed_config"]["mutations"]
            ["request_mutations"] if "remove" in m}


def envoy_removed_pattern() -> re.Pattern:
    """The header-name regex the Envoy example removes every match of (remove_on_match)."""
    hcm = yaml.safe_load(text_of("envoy.yaml"))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    [regex] = [m["remove_on_match"]["key_matcher"]["safe_regex"]["regex"]
               for m in hcm["http_filters"][0]["typed_config"]["mutations"]
               ["request_mutations"] if "remove_on_match" in m]
    return re.compile(regex)  # RE2 syntax; a character class reads the same in Python


def text_of(name: str) -> str:
    return (DOCS / name).read_text()


def test_traefik_labels_forward_auth_to_verify_and_copy_the_identity():
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    prefix = "traefik.http.middlewares.keygate.forwardauth."
    assert labels[prefix + "address"].endswith(":8080/_keygate/v1/verify")
    assert labels[prefix + "trustForwardHeader"] == "false"
    assert labels[prefix + "authResponseHeaders"].split(",")[:4] == list(IDENTITY)
    chain = labels["traefik.http.routers.api.middlewares"].split(",")
    assert chain[0].startswith("keygate-clean") and chain[1].startswith("keygate@")
    cleaned = {k.rsplit(".", 1)[1] for k in labels if "keygate-clean.headers" in k}
    # exactly: the identity headers and every name keygate drops from clients, in both
    # spellings, but never one Traefik sets itself (that would remove Traefik's own value)
    assert {h.lower() for h in cleaned} == {h.lower() for h in IDENTITY} | {
        h.lower().replace("-", "_") for h in IDENTITY} | (
        FROM_CLIENTS - SET_BY["traefik-compose.yml"]) | {
        h.replace("-", "_") for h in FROM_CLIENTS if "-" in h}


def test_traefik_drops_the_underscore_spellings_of_the_identity_headers():
    """Traefik (Go) passes a client's ``X_Workspace_Id`` on as a header of its own, and many
    upstreams (Rack, PHP, CGI-style ``HTTP_X_WORKSPACE_ID``) read it as ``X-Workspace-Id``:
    on a public route, which keygate answers with no identity to copy, the client's copy was
    the one the upstream read. keygate's own proxy removes those spellings, nginx drops them
    (``underscores_in_headers off``) and the Envoy example drops them
    (``headers_with_underscores_action``); the Traefik example did not."""
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    for name in IDENTITY:
        assert labels[f"traefik.http.middlewares.keygate-clean.headers.customrequestheaders."
                      f"{name.replace('-', '_')}"] == ""


def test_envoy_ext_authz_uses_the_verify_prefix_and_fails_closed():
    text = text_of("envoy.yaml")
    doc = yaml.safe_load(text)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters == ["envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz",
                       "envoy.filters.http.router"]
    authz = hcm["http_filters"][1]["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["http_service"]["path_prefix"] == "/_keygate/v1/verify"
    upstream = {p["exact"] for p in authz["http_service"]["authorization_response"]
                ["allowed_upstream_headers"]["patterns"]}
    assert {h.lower() for h in IDENTITY} <= upstream
    removed = {m["remove"] for m in hcm["http_filters"][0]["typed_config"]["mutations"]
               ["request_mutations"] if "remove" in m}
    assert removed == {h.lower() for h in IDENTITY} | (FROM_CLIENTS - SET_BY["envoy.yaml"])


def test_ingress_nginx_sets_the_original_request_headers_itself():
    configmap, ingress = yaml.safe_load_all(text_of("ingress-nginx.yaml"))
    assert configmap["data"] == {"X-Forwarded-Method": "$request_method",
                                 "X-Forwarded-Uri": "$request_uri",
                                 "X-Forwarded-Host": "$best_http_host",
                                 "X-Forwarded-Content-Length": "$content_length",
                                 "X-Request-Id": "$req_id"}
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/auth-url"].endswith(":8080/_keygate/v1/verify")
    assert notes["nginx.ingress.kubernetes.io/auth-proxy-set-headers"] == \
        f"{configmap['metadata']['namespace']}/{configmap['metadata']['name']}"
    # the identity, never X-Request-Id: the controller sets its own on the API's request
    assert notes["nginx.ingress.kubernetes.io/auth-response-headers"].split(",") == \
        list(IDENTITY)


def test_ingress_nginx_shows_how_to_keep_the_key_from_the_api():
    """nginx.conf, Traefik and Envoy remove the credential headers before the request reaches
    the API; ingress-nginx has no annotation for that but a configuration snippet (refused by
    controllers that do not allow snippets, the default), so the example carries one, commented,
    covering every header keygate reads a key from, and says the API gets the key without it."""
    text = text_of("ingress-nginx.yaml")
    snippet = [line.strip().lstrip("#").strip() for line in text.splitlines()
               if "proxy_set_header" in line]
    cleared = {line.split()[1].lower() for line in snippet if line.endswith('"";')}
    assert {"authorization"} | {h.lower() for h in KeysConfig().headers} <= cleared
    assert "configuration-snippet" in text
    table = (DOCS.parent / "deployment-modes.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| `ingress-nginx.yaml`"))
    assert "configuration-snippet" in row


def test_envoy_hands_keygate_the_clients_address_for_the_failure_throttle():
    """The failure throttle and the verification queue count failures per client IP, read
    from ``X-Forwarded-For`` when the peer is in ``trusted_proxies``. Envoy's ext_authz HTTP
    service sends only Host, Method, Path, Content-Length, Authorization and the
    ``allowed_headers``: without ``x-forwarded-for`` there, keygate saw every client as
    Envoy, and 20 wrong keys from anyone locked every client's cold keys out. Envoy appends
    the client's address only with ``use_remote_address: true`` (otherwise a client's own
    ``X-Forwarded-For`` would pass as sent and pick whose address is locked out)."""
    text = text_of("envoy.yaml")
    hcm = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]
    assert hcm.get("use_remote_address") is True
    authz = hcm["http_filters"][1]["typed_config"]
    sent = {p["exact"] for p in authz["http_service"]["authorization_request"]
            ["allowed_headers"]["patterns"]}
    assert "x-forwarded-for" in sent
    assert "trusted_proxies" in text


def test_envoy_hands_keygate_the_method_override_headers():
    """keygate authorises a request that names another method (X-HTTP-Method-Override & co.)
    as that method too, in verify mode as in the proxy. Envoy's ext_authz HTTP service sends
    keygate only the ``allowed_headers`` (and Host, Method, Path, Content-Length,
    Authorization) but forwards every header to the API: without the override headers in
    ``allowed_headers``, keygate judged a plain GET and the API performed the DELETE the
    header named. Envoy lower-cases header names, and this example drops '_' spellings."""
    from gateway.overrides import HEADERS
    hcm = yaml.safe_load(text_of("envoy.yaml"))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    sent = {p["exact"] for p in hcm["http_filters"][1]["typed_config"]["http_service"]
            ["authorization_request"]["allowed_headers"]["patterns"]}
    assert {h.lower() for h in HEADERS} <= sent
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == \
        "DROP_HEADER"


def test_traefik_and_envoy_keep_a_clients_url_override_headers_from_the_api():
    """The API behind the proxy receives the client's headers; one that routes by
    ``X-Original-URL`` / ``X-Rewrite-URL`` would serve another path than keygate checked.
    keygate's own proxy drops them from clients; the shipped configs remove them too."""
    overrides = {"x-original-url", "x-original-uri", "x-rewrite-url", "x-script-name"}
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    prefix = "traefik.http.middlewares.keygate-clean.headers.customrequestheaders."
    assert {k[len(prefix):].lower() for k, v in labels.items()
            if k.startswith(prefix) and v == ""} >= overrides
    doc = yaml.safe_load(text_of("envoy.yaml"))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    removed = {m["remove"] for m in hcm["http_filters"][0]["typed_config"]["mutations"]
               ["request_mutations"] if "remove" in m}
    assert removed >= overrides


def test_every_verify_config_keeps_a_clients_auth_proxy_user_headers_from_the_api():
    """An API set up behind an authenticating proxy (Grafana's auth.proxy, oauth2-proxy,
    Authelia, Apache/nginx auth modules) takes ``X-WEBAUTH-USER``, ``X-Remote-User`` and the
    like as the signed-in user from the proxy's address: passed on from a client, as the
    shipped configs did, it signed the client in as whoever it named, behind a public route
    or a key of its own. keygate's own proxy drops every one of them from clients
    (``AUTH_USER``); each shipped config removes the same names (Traefik, which passes
    names with "_" on, in both spellings; nginx and the Envoy example drop those)."""
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    prefix = "traefik.http.middlewares.keygate-clean.headers.customrequestheaders."
    cleaned = {k[len(prefix):] for k, v in labels.items() if k.startswith(prefix) and v == ""}
    assert {h.lower() for h in cleaned if "-" in h} >= AUTH_USER
    assert {h.lower().replace("_", "-") for h in cleaned if "_" in h} >= AUTH_USER
    hcm = yaml.safe_load(text_of("envoy.yaml"))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    assert {m["remove"] for m in hcm["http_filters"][0]["typed_config"]["mutations"]
            ["request_mutations"] if "remove" in m} >= AUTH_USER
    for name, text in (("nginx.conf", text_of("nginx.conf")),
                       ("ingress-nginx.yaml", text_of("ingress-nginx.yaml"))):
        cleared = {line.split()[1].lower() for line in
                   (raw.strip().lstrip("#").strip() for raw in text.splitlines())
                   if line.startswith("proxy_set_header") and line.endswith('"";')}
        assert cleared >= AUTH_USER, (name, AUTH_USER - cleared)


def test_traefik_drops_the_underscore_spellings_of_the_url_override_headers():
    """Traefik passes a client's ``X_Original_URL`` on as a header of its own, and PHP
    (Symfony and Zend read ``$_SERVER['HTTP_X_ORIGINAL_URL']``), Rack and CGI-style upstreams
    read it as ``X-Original-URL``: the example removed the "-" spellings only, so the "_" one
    named the path such an API served. keygate's own proxy drops every spelling; nginx and
    the Envoy example drop names with "_"."""
    from gateway.proxying.headers import PATH_OVERRIDE
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    prefix = "traefik.http.middlewares.keygate-clean.headers.customrequestheaders."
    cleaned = {k[len(prefix):].lower() for k, v in labels.items()
               if k.startswith(prefix) and v == "" and "_" in k[len(prefix):]}
    assert {h.replace("-", "_") for h in PATH_OVERRIDE} <= cleaned


def test_every_verify_example_clears_the_host_override_headers_keygate_drops():
    """keygate's own proxy drops a client's ``X-Original-Host``, ``X-Host`` and
    ``X-HTTP-Host-Override`` and ``X-Forwarded-Server`` (``HOST_OVERRIDE``: an API builds its
    absolute URLs, a password-reset link, from them: host header injection). The r-hdrs merge
    taught docs/verify/ the path-override and auth-proxy user names but not these, so in
    verify mode a client's ``X-Host`` still reached the API. Each example now clears them the
    way it clears the others; Traefik writes ``X-Forwarded-Server`` itself (its own name, a
    client's copy replaced), so it keeps that one."""
    import re
    nginx = {m.lower() for m in re.findall(r'proxy_set_header\s+(\S+)\s+""',
                                           text_of("nginx.conf"))}
    assert HOST_OVERRIDE <= nginx, HOST_OVERRIDE - nginx
    snippet = {line.strip().lstrip("#").split()[1].lower()
               for line in text_of("ingress-nginx.yaml").splitlines()
               if "proxy_set_header" in line and line.rstrip().endswith('"";')}
    assert HOST_OVERRIDE <= snippet, HOST_OVERRIDE - snippet
    hcm = yaml.safe_load(text_of("envoy.yaml"))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    removed = {m["remove"] for m in hcm["http_filters"][0]["typed_config"]["mutations"]
               ["request_mutations"] if "remove" in m}
    assert HOST_OVERRIDE <= removed, HOST_OVERRIDE - removed
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    prefix = "traefik.http.middlewares.keygate-clean.headers.customrequestheaders."
    cleaned = {k[len(prefix):].lower() for k, v in labels.items()
               if k.startswith(prefix) and v == ""}
    wanted = HOST_OVERRIDE - {"x-forwarded-server"}
    assert wanted | {h.replace("-", "_") for h in wanted} <= cleaned, \
        wanted - cleaned


def test_ingress_nginx_clears_the_forwarding_headers_the_controller_does_not_set():
    """ingress-nginx sets X-Forwarded-For/-Host/-Port/-Proto and X-Real-IP itself (unless
    ``use-forwarded-headers`` is on, which the example says to keep off at the edge), but passes
    a client's ``Forwarded`` (``host=``, ``for=``), ``X-Forwarded-Prefix`` and
    ``X-Forwarded-Ssl`` on as sent; the snippet clears them, as keygate's own proxy drops them
    and the nginx example now does."""
    snippet = {line.strip().lstrip("#").split()[1].lower()
               for line in text_of("ingress-nginx.yaml").splitlines()
               if "proxy_set_header" in line and line.rstrip().endswith('"";')}
    assert {"forwarded", "x-forwarded-prefix", "x-forwarded-scheme", "x-forwarded-ssl"} <= snippet
    assert "use-forwarded-headers" in text_of("ingress-nginx.yaml")


def test_envoy_verify_example_keeps_a_clients_forwarded_host_and_address_from_the_api():
    """docs/verify/envoy.yaml removed a client's X-Host, X-Original-Host, X-Forwarded-Server
    (host injection) and the auth-proxy user headers, but not X-Forwarded-Host, Forwarded or
    X-Real-IP: Envoy passes those on from a downstream client as sent (use_remote_address only
    appends to X-Forwarded-For and sets X-Forwarded-Proto), so an API behind it built its
    links from the client's X-Forwarded-Host, exactly what keygate's own proxy prevents."""
    hcm = yaml.safe_load(text_of("envoy.yaml"))["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]
    removed = set()
    for m in hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]:
        if "remove" in m:  # removed, or set by Envoy itself (append with overwrite)
            removed.add(m["remove"].lower())
        elif "append" in m:
            removed.add(m["append"]["header"]["key"].lower())
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            removed.update(h.lower() for h in route.get("request_headers_to_remove", ()))
            removed.update(h["header"]["key"].lower()
                           for h in route.get("request_headers_to_add", ()))
    missing = FORWARDING - removed
    assert not missing, missing
    # X-Forwarded-For and -Proto are Envoy's own at the edge
    assert hcm["use_remote_address"] is True


def test_traefik_keeps_a_clients_forwarded_header_from_the_api():
    """Traefik replaces a client's X-Forwarded-For/-Host/-Port/-Proto/-Server and X-Real-Ip
    (its forwardedHeaders, no trusted IPs), but passes ``Forwarded`` (``host=``, ``for=``,
    ``proto=``: what Spring's ForwardedHeaderFilter and ASP.NET read first),
    ``X-Forwarded-Prefix``, ``-Scheme`` (Rack reads it before ``-Proto``) and ``-Ssl`` on as
    sent; and, as for every other name, the "_" spellings of all of them
    (``X_Forwarded_Host``), which Rack, PHP and CGI read as the same header (Puma's
    CVE-2024-45614: a client's "_" copy clobbering the proxy's). The example clears them."""
    doc = yaml.safe_load(text_of("traefik-compose.yml"))
    labels = dict(label.split("=", 1) for label in doc["services"]["api"]["labels"])
    prefix = "traefik.http.middlewares.keygate-clean.headers.customrequestheaders."
    cleaned = {k[len(prefix):].lower() for k, v in labels.items()
               if k.startswith(prefix) and v == ""}
    replaced_by_traefik = {"x-forwarded-host", "x-real-ip", "x-forwarded-port"}
    wanted = (FORWARDING - replaced_by_traefik) | {
        h.replace("-", "_") for h in FORWARDING | {"x-forwarded-for", "x-forwarded-proto"}
        if "-" in h}
    assert wanted <= cleaned, wanted - cleaned


def test_every_verify_example_clears_every_header_keygates_proxy_drops_from_clients():
    """keygate's own proxy drops a client's True-Client-IP, CF-Connecting-IP, X-Client-IP,
    Fastly-Client-IP, X-Cluster-Client-IP and the other client-address headers, and
    X-Forwarded-Uri/-Method, from an untrusted peer (FROM_PROXIES, X-Forwarded-*); the
    examples cleared only X-Real-IP and the forwarding headers, so behind the documented
    nginx, ingress-nginx, Envoy and Traefik setups a client handed the API a forged address
    (the one it logs, rate-limits and allow-lists by) in any of the others. Each example now
    clears every name of the set it does not set itself: Traefik, which passes names with
    "_" on, in both spellings; nginx, ingress-nginx and the Envoy example drop those."""
    nginx = nginx_location_headers(text_of("nginx.conf"))
    missing = FROM_CLIENTS - SET_BY["nginx.conf"] - {n for n, v in nginx.items() if v == '""'}
    assert not missing, sorted(missing)
    assert {n for n, v in nginx.items() if v != '""'} & FROM_CLIENTS == SET_BY["nginx.conf"]

    snippet = nginx_location_headers(text_of("ingress-nginx.yaml"), commented=True)
    missing = FROM_CLIENTS - SET_BY["ingress-nginx.yaml"] - {
        n for n, v in snippet.items() if v == '""'}
    assert not missing, sorted(missing)

    missing = FROM_CLIENTS - SET_BY["envoy.yaml"] - envoy_removed()
    assert not missing, sorted(missing)

    cleaned = traefik_cleaned()
    missing = FROM_CLIENTS - SET_BY["traefik-compose.yml"] - {h.lower() for h in cleaned}
    assert not missing, sorted(missing)
    underscored = {h.lower().replace("_", "-") for h in cleaned if "_" in h}
    missing = {h for h in FROM_CLIENTS if "-" in h} - underscored
    assert not missing, sorted(missing)


def test_envoy_removes_the_punctuated_spellings_lighttpd_maps_onto_the_dash_names():
    """lighttpd's CGI, FastCGI and SCGI hand ``X.Workspace.Id`` and ``X+HTTP+Method+Override``
    to the application as ``HTTP_X_WORKSPACE_ID`` and ``HTTP_X_HTTP_METHOD_OVERRIDE``, and
    Envoy passes such names on: the example removed only the ``-`` spellings (and ``_`` ones,
    headers_with_underscores_action), so a client named the identity, a method or its address
    to such an API under another spelling. Every name with '.', '+' or other punctuation
    goes; no name spelled with letters, digits and '-' does (Envoy lower-cases names)."""
    from gateway.models import METHOD_OVERRIDE_HEADERS
    pattern = envoy_removed_pattern()
    names = ({h.lower() for h in IDENTITY} | {h.lower() for h in METHOD_OVERRIDE_HEADERS}
             | FROM_CLIENTS)
    for name in sorted(names):
        assert not pattern.fullmatch(name), name
        for mark in ".+!#$%&'*^`|~":
            if "-" in name:
                assert pattern.fullmatch(name.replace("-", mark)), (name, mark)
                assert pattern.fullmatch(name.replace("-", mark, 1)), (name, mark)
    for plain in ("authorization", "x-api-key", "content-type", "x-request-id", "traceparent"):
        assert not pattern.fullmatch(plain)
