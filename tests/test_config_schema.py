"""docs/config.schema.json (the JSON Schema editors use for the config file) and the loader
(gateway.config) agree: on which keys exist at every level, on the example configs, and on a
table of good and bad values. A key added to the loader without the schema fails here, and so
does one missing from docs/configuration.md's tables, or a ```yaml example in the README or
docs/ that the loader refuses."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from gateway.config import load_config
from gateway.errors import ConfigError

jsonschema_rs = pytest.importorskip("jsonschema_rs")  # comes with the test extra (schemathesis)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "config.schema.json").read_text())
VALIDATOR = jsonschema_rs.Draft202012Validator(SCHEMA)

BASE = {"upstreams": {"crm": {"url": "http://127.0.0.1:9"}},
        "routes": [{"path": "/x", "upstream": "crm"}],
        "plans": {"p": {"monthly_requests": 1}},
        "cors": {"allow_origins": ["https://app.example"]}}


def loader_accepts(doc: object, tmp_path: Path) -> tuple[bool, list[str]]:
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(path)
    except ConfigError as exc:
        return False, exc.problems
    return True, []


def schema_at(path: list[str]) -> dict:
    """The object schema at a config path (``plans.*`` and ``upstreams.*`` are any name)."""
    node = SCHEMA
    for part in path:
        if part == "[]":
            node = node["items"]
        elif part == "*":
            extra = node["additionalProperties"]
            node = next(alt for alt in extra.get("anyOf", [extra]) if alt.get("type") == "object")
        else:
            node = node["properties"][part]
    return node


# (config path in the probe document, path in the schema)
OBJECTS = [
    ([], []), (["server"], ["server"]), (["admin"], ["admin"]), (["store"], ["store"]),
    (["server", "timeouts"], ["server", "timeouts"]), (["server", "tls"], ["server", "tls"]),
    (["admin", "tls"], ["admin", "tls"]), (["keys"], ["keys"]), (["keys", "argon2"], ["keys", "argon2"]),
    (["keys", "failures"], ["keys", "failures"]),
    (["keys", "verify_queue"], ["keys", "verify_queue"]), (["plans", "p"], ["plans", "*"]),
    (["upstreams", "crm"], ["upstreams", "*"]), (["routes", 0], ["routes", "[]"]),
    (["identity_headers"], ["identity_headers"]),
    (["identity_signature"], ["identity_signature"]), (["tracing"], ["tracing"]),
    (["cors"], ["cors"]),
]


@pytest.mark.parametrize("where, schema_path", OBJECTS,
                         ids=[".".join(map(str, w)) or "top" for w, _ in OBJECTS])
def test_every_level_allows_the_same_keys_in_the_schema_and_the_loader(where, schema_path,
                                                                        tmp_path):
    doc = copy.deepcopy(BASE)
    node = doc
    for part in where:
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    node["zzzzzzzz"] = 1
    accepted, problems = loader_accepts(doc, tmp_path)
    assert not accepted
    (problem,) = [p for p in problems if "zzzzzzzz" in p]
    allowed = set(re.search(r"\(allowed: ([^)]*)\)", problem).group(1).split(", "))
    schema = schema_at(schema_path)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == allowed
    assert not VALIDATOR.is_valid(doc)


def example_configs() -> list[tuple[str, object]]:
    found = [("config.example.yaml", yaml.safe_load((ROOT / "config.example.yaml").read_text())),
             ("deploy/config.yaml", yaml.safe_load((ROOT / "deploy/config.yaml").read_text()))]
    # the source of the Kubernetes ConfigMap (kustomization.yaml's configMapGenerator)
    found.append(("deploy/k8s/config.yaml",
                  yaml.safe_load((ROOT / "deploy/k8s/config.yaml").read_text())))
    return found


@pytest.mark.parametrize("name, doc", example_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_shipped_configs_validate_against_the_schema(name, doc):
    errors = [f"{e.instance_path}: {e.message}" for e in VALIDATOR.iter_errors(doc)]
    assert errors == []


def with_(path: str, value: object) -> dict:
    doc = copy.deepcopy(BASE)
    node: object = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    return doc


CASES = [
    ("server.port", 8080, True), ("server.port", 0, False), ("server.port", 70000, False),
    ("server.port", "eighty", False), ("server.workers", 4, True), ("server.workers", 0, False),
    ("server.access_log", "text", True), ("server.access_log", "xml", False),
    ("server.log_level", "loud", False), ("server.metrics_workspace_labels", "yes", True),
    ("admin.token_env", "MY_TOKEN", True), ("admin.token_env", "1BAD", False),
    ("store.redis_url", "redis://127.0.0.1:6379/0", True),
    ("store.redis_url", "redis+sentinel://s1:26379/mymaster", True),
    ("store.redis_url", "memcached://x", False), ("store.on_store_error", "open", True),
    ("store.on_store_error", "maybe", False), ("store.timeout", 0, False),
    ("store.timeout", 0.5, True), ("keys.prefix", "acme", True), ("keys.prefix", "ACME", False),
    ("keys.prefix", "waytoolongprefix", False), ("keys.environments", [], False),
    ("keys.environments", ["live", "live"], False), ("keys.headers", ["X-Key"], True),
    ("keys.headers", ["bad header"], False), ("keys.argon2.time_cost", 0, False),
    ("keys.cache_ttl", -1, False), ("keys.failures.per_ip", 0, False),
    ("keys.failures.window_seconds", 3153600000, True),
    ("keys.failures.window_seconds", 3153600001, False),
    ("keys.failures.per_key", None, True), ("keys.verify_queue.total", 0, False),
    ("plans.p.monthly_requests", None, True), ("plans.p.monthly_requests", -1, False),
    ("plans.p.rate_limit", "5/s", True), ("plans.p.rate_limit", "300/m", True),
    ("plans.p.rate_limit", "5/h", False), ("plans.p.max_keys", "many", False),
    ("roles", {"reader": ["people:read"]}, True), ("roles", {"reader": ["bad scope"]}, False),
    ("upstreams.crm", "http://127.0.0.1:9000", True), ("upstreams.crm.url", "ftp://x", False),
    ("upstreams.crm.url", "http://u:p@crm", False), ("upstreams.crm", "http://u@crm/", False),
    ("upstreams.crm.url", "http://crm internal", False), ("upstreams.crm.url", "http://h/?", False),
    ("upstreams.crm.url", "https://[::1]:8443/api/v1", True),
    ("upstreams.crm.timeout", 0, False), ("upstreams.crm.max_connections", 0, False),
    ("upstreams.crm.max_connections", 8, True), ("server.timeouts.body", 0, False),
    ("server.timeouts.idle", 5, True), ("server.max_connections", 0, False), ("routes.0.methods", ["get", "POST"], True),
    ("routes.0.methods", [], False), ("routes.0.path", "people", False),
    ("routes.0.public", True, True), ("routes.0.websocket", True, True),
    ("routes.0.websocket", "yes", True), ("identity_headers.workspace", "X-Tenant", True),
    ("server.websocket_recheck", 1, True), ("server.websocket_recheck", 3600, True),
    ("server.websocket_recheck", 0.5, False), ("server.websocket_recheck", 3601, False),
    ("server.websocket_recheck", "often", False),
    ("identity_headers.workspace", "bad header", False),
    ("server.port", "${PORT:-8080}", True),
    ("server.host", "local host", False), ("admin.host", "127.0.0.1\r", False),
    ("admin.host", "::1", True),
    ("cors.allow_origins", "*", True), ("cors.allow_origins", [], False),
    ("cors.allow_origins", "https://app.example", False),
    ("cors.allow_origins", ["http://localhost:3000", "capacitor://localhost"], True),
    ("cors.allow_origins", ["https://app.example/"], False),
    ("cors.allow_origins", ["null"], False), ("cors.allow_origins", ["https://*.a.com"], False),
    ("cors.allow_headers", ["Idempotency-Key"], True), ("cors.allow_headers", ["*"], False),
    ("cors.expose_headers", ["bad header"], False), ("cors.max_age", -1, False),
    ("cors.max_age", 86401, False), ("cors.allow_credentials", "yes", True),
    ("cors", None, True), ("cors", {"allow_origins": "*", "allow_credentials": True}, False),
    ("cors", {"allow_origins": ["https://a.example"], "allow_credentials": True}, True),
    # plan and upstream names: a letter or digit, then letters, digits, `_`, `.`, `-` (the
    # schema took a leading `_`, `.` or `-`, which the loader refuses)
    ("plans", {"Pro.Plan_1": {}}, True), ("plans", {"-bad": {}}, False),
    ("plans", {".hidden": {}}, False), ("plans", {"_p": {}}, False),
    ("upstreams", {"crm": "http://127.0.0.1:9", "Up.Stream_1": "http://127.0.0.1:9"}, True),
    ("upstreams", {"crm": "http://127.0.0.1:9", "-up": "http://127.0.0.1:9"}, False),
    ("upstreams", {"crm": "http://127.0.0.1:9", "_up": "http://127.0.0.1:9"}, False),
    # a rate is 1 to 10^9 requests (the schema took 0/s and 1000000001/s); a method is one of
    # HTTP's, in any case (the schema took any word)
    ("plans.p.rate_limit", "0/s", False), ("plans.p.rate_limit", "00/m", False),
    ("plans.p.rate_limit", "05/s", True), ("plans.p.rate_limit", " 5 / m ", True),
    ("plans.p.rate_limit", "1000000000/s", True), ("plans.p.rate_limit", "1000000001/s", False),
    ("routes.0.methods", ["Get", "connect", "OPTIONS"], True),
    ("routes.0.methods", ["FOO"], False), ("routes.0.methods", ["PROPFIND"], False),
]


@pytest.mark.parametrize("path, value, valid", CASES,
                         ids=[f"{p}={v!r}" for p, v, _ in CASES])
def test_schema_and_loader_agree_on_values(path, value, valid, tmp_path, monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    doc = with_(path, value)
    accepted, problems = loader_accepts(doc, tmp_path)
    assert accepted is valid, problems
    assert VALIDATOR.is_valid(doc) is valid


class Yaml12Booleans(yaml.SafeLoader):
    """PyYAML with YAML 1.2's booleans (true/false only): a plain yes, no, on or off is text,
    as the editors and tools that validate against the schema read it."""


Yaml12Booleans.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Booleans.add_implicit_resolver("tag:yaml.org,2002:bool",
                                     re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))

# (YAML as written, valid): plain words YAML 1.1 reads as booleans and YAML 1.2 as text
PLAIN_WORDS = [
    ("server: {access_log: off}", True), ("server: {access_log: Off}", False),
    ("server: {access_log: on}", False), ("server: {access_log: 'off'}", True),
    ("server: {metrics_workspace_labels: yes}", True),
    ("server: {metrics_workspace_labels: on}", True),
    ("server: {metrics_workspace_labels: true}", True),
    ("server: {metrics_workspace_labels: FALSE}", True),
    ("routes: [{path: /x, upstream: crm, public: yes}]", True),
    ("routes: [{path: /x, upstream: crm, public: No}]", True),
    ("routes: [{path: /x, upstream: crm, public: true}]", True),
    ("routes: [{path: /x, upstream: crm, websocket: off}]", True),
    ("routes: [{path: /x, upstream: crm, public: false, websocket: False}]", True),
    ("cors: {allow_origins: '*', allow_credentials: no}", True),
    ("keys: {prefix: on}", True), ("keys: {prefix: true}", False),
    ("keys: {environments: [live, off]}", True), ("keys: {environments: [live, false]}", False),
    ("store: {on_store_error: off}", False),
    ("routes: [{path: /x, upstream: crm, public: 'yes'}]", True),
    ("routes: [{path: /x, upstream: crm, public: 'y'}]", False),
    ("routes: [{path: /x, upstream: crm, public: yEs}]", False),
]


@pytest.mark.parametrize("text, valid", PLAIN_WORDS, ids=[t for t, _ in PLAIN_WORDS])
def test_schema_and_loader_agree_on_plain_yaml_1_1_boolean_words(text, valid, tmp_path):
    """`access_log: off` as docs/configuration.md writes it was refused by the loader (PyYAML
    read YAML 1.1's false) and taken by the schema (YAML 1.2: text); `public: yes` the other
    way round (now both take it, the loader with a warning to write true). The file is validated as an editor reads it (YAML 1.2 booleans) and loaded as
    keygate loads it: both agree."""
    path = tmp_path / "probe.yaml"
    path.write_text("upstreams: {crm: {url: 'http://127.0.0.1:9'}}\n"
                    + ("" if text.startswith("routes:") else "routes: [{path: /x, upstream: crm}]\n")
                    + text + "\n")
    try:
        load_config(path)
        accepted, problems = True, []
    except ConfigError as exc:
        accepted, problems = False, exc.problems
    assert accepted is valid, problems
    as_editors_read_it = yaml.load(path.read_text(), Loader=Yaml12Booleans)
    assert VALIDATOR.is_valid(as_editors_read_it) is valid


def integer_fields(node: object = SCHEMA, path: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """(config path, least value) of every field the schema types ``integer``."""
    found: list[tuple[str, int]] = []
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
            found.append((".".join(path), node.get("minimum", 1)))
        for key, value in node.items():
            if key == "properties":
                for name, sub in value.items():
                    found += integer_fields(sub, path + (name,))
            elif key == "additionalProperties" and isinstance(value, dict):
                name = "p" if path == ("plans",) else "crm"
                found += integer_fields(value, path + (name,))
            elif key == "anyOf":
                for alt in value:
                    found += integer_fields(alt, path)
    return found


@pytest.mark.parametrize("path, least", integer_fields(), ids=lambda v: str(v))
def test_a_whole_number_written_with_a_fraction_is_what_the_schema_says(path, least, tmp_path):
    """JSON Schema's ``integer`` (the schema's, and the admin API's since it takes 60.0 where
    its document says integer) includes 60.0, which the loader refused: an editor validating
    against the schema passed a file `config check` then failed. 60.5 is refused by both."""
    assert loader_accepts(with_(path, least), tmp_path)[0]  # the field, in a valid document
    for value, valid in ((float(least), True), (least + 0.5, False)):
        doc = with_(path, value)
        assert VALIDATOR.is_valid(doc) is valid
        accepted, problems = loader_accepts(doc, tmp_path)
        assert accepted is valid, (value, problems)
        if valid:  # read as the integer itself
            as_float = load_config(tmp_path / "probe.yaml")
            loader_accepts(with_(path, least), tmp_path)
            assert as_float == load_config(tmp_path / "probe.yaml")


# --- docs/configuration.md: the reference names every key the loader takes, and no other ------

REFERENCE = (ROOT / "docs" / "configuration.md").read_text()


def loader_keys(where: list) -> set[str]:
    """The keys the loader allows at ``where`` (its "allowed:" list for an unknown key)."""
    doc = copy.deepcopy(BASE)
    node = doc
    for part in where:
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    node["zzzzzzzz"] = 1
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            load_config(path)
        except ConfigError as exc:
            (problem,) = [p for p in exc.problems if "zzzzzzzz" in p]
    return set(re.search(r"\(allowed: ([^)]*)\)", problem).group(1).split(", "))


def code_key_paths() -> set[str]:
    """Every key path the loader accepts, written as the reference writes it (``plans.NAME.x``,
    ``upstreams.NAME.x``, ``routes.x``); below the top level, objects that only group other
    keys (``server.timeouts``) are left out: their keys have the rows."""
    names = {("plans", "p"): "plans.NAME", ("upstreams", "crm"): "upstreams.NAME",
             ("routes", 0): "routes"}
    levels = {tuple(where): names.get(tuple(where), ".".join(map(str, where)))
              for where, _ in OBJECTS}
    found = set()
    for where, prefix in levels.items():
        for key in loader_keys(list(where)):
            path = f"{prefix}.{key}" if prefix else key
            if not where or (*where, key) not in levels:  # not a key that only groups others
                found.add(path)
    return found


def reference_key_paths() -> set[str]:
    """The key paths docs/configuration.md documents: each section's `## `name`` heading and
    the backticked names in the first column of its tables (relative to the section, unless
    they already start with a top-level key)."""
    found = set()
    for section in re.split(r"\n(?=## )", REFERENCE)[1:]:
        heading = section.splitlines()[0]
        named = re.findall(r"`([a-z_]+)`", heading)
        found |= set(named)
        prefix = {"upstreams": "upstreams.NAME"}.get(named[0], named[0])
        for row in re.findall(r"^\| *(`[^|]*)\|", section, re.M):
            for key in re.findall(r"`([a-zA-Z0-9_.]+)`", row):
                top = key.split(".", 1)[0]
                found.add(key if top in named else f"{prefix}.{key}")
    return found


def test_the_configuration_reference_names_every_key_the_loader_takes_and_no_other():
    """docs/configuration.md is the reference an operator writes a config from: every key the
    loader accepts has a row (or, for a top-level key, a section) there, and every row names a
    key the loader accepts."""
    code, documented = code_key_paths(), reference_key_paths()
    assert sorted(code - documented) == [], "accepted but not in docs/configuration.md"
    assert sorted(documented - code) == [], "in docs/configuration.md but refused by the loader"


def test_every_object_of_the_schema_is_compared_with_the_loader():
    """OBJECTS above must reach every mapping of the schema with fixed keys, or a level could
    drift from the loader unseen."""
    def walk(node: dict, path: tuple) -> set[tuple]:
        found = set()
        if "properties" in node:
            found.add(path)
            for key, sub in node["properties"].items():
                found |= walk(sub, (*path, key))
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            found |= walk(extra, (*path, "*"))
        if isinstance(node.get("items"), dict):
            found |= walk(node["items"], (*path, "[]"))
        for alt in node.get("anyOf", []) + node.get("oneOf", []):
            found |= walk(alt, path)
        return found
    assert walk(SCHEMA, ()) <= {tuple(schema_path) for _, schema_path in OBJECTS}


# --- every YAML example in the README and docs/ is a config keygate accepts -------------------

DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def yaml_examples() -> list[tuple[str, str]]:
    found = []
    for page in DOC_PAGES:
        text = page.read_text()
        for block in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            line = text[:block.start()].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", block.group(1)))
    return found


@pytest.mark.parametrize("where, text", yaml_examples(),
                         ids=[where for where, _ in yaml_examples()])
def test_every_yaml_example_in_the_docs_is_accepted(where, text, tmp_path, monkeypatch):
    """A snippet an operator pastes into the config must load: each ```yaml block of the README
    and docs/, laid over a minimal config (its `routes` replace the minimal one's, its
    `upstreams` join it), passes `keygate config check` and the JSON schema. Certificate paths
    are pointed at a real pair; secrets a snippet names by variable are set."""
    from harness import openssl
    fragment = yaml.safe_load(text)
    assert isinstance(fragment, dict), where
    doc = {key: copy.deepcopy(value) for key, value in BASE.items() if key != "cors"}
    for key, value in fragment.items():
        if key == "upstreams":
            doc["upstreams"].update(value)
        else:
            doc[key] = value
    text = yaml.safe_dump(doc)
    pems = set(re.findall(r"(/[\w./-]+\.pem)", text))
    if pems:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "2", "-subj", "/CN=localhost",
                "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"))
    for path in pems:
        pair = "key.pem" if "key" in Path(path).name else "cert.pem"
        text = text.replace(path, str(tmp_path / pair))
    for name in re.findall(r"secret_env: ([A-Z_][A-Z0-9_]*)", text):
        monkeypatch.setenv(name, "s" * 32)
    (tmp_path / "config.yaml").write_text(text)
    try:
        load_config(tmp_path / "config.yaml")
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc.problems}")
    assert [e.message for e in VALIDATOR.iter_errors(yaml.safe_load(text))] == [], where


def reference_defaults() -> list[tuple[str, str]]:
    """(key path, the reference's default cell) for every table row that has a default."""
    found = []
    for section in re.split(r"\n(?=## )", REFERENCE)[1:]:
        named = re.findall(r"`([a-z_]+)`", section.splitlines()[0])
        prefix = {"upstreams": "upstreams.NAME"}.get(named[0], named[0])
        header: list[str] = []
        for line in section.splitlines():
            cells = [c.strip() for c in line.replace("\\|", "¦").strip("|").split("|")]
            if line.startswith("| key |"):
                header = cells
            elif "default" in header and line.startswith("| `"):
                for key in re.findall(r"`([a-zA-Z0-9_.]+)`", cells[0]):
                    path = key if key.split(".")[0] in named else f"{prefix}.{key}"
                    found.append((path, cells[header.index("default")]))
    return found


def test_the_configuration_reference_gives_the_defaults_the_loader_uses(tmp_path, monkeypatch):
    """Each `default` cell of docs/configuration.md is the value the loader gives a key the
    file leaves out (`none`/`null` for None, a YAML list for a tuple)."""
    monkeypatch.setenv("KG_PROBE_SECRET", "s" * 32)
    # each optional section present with its required keys only, so that its other keys'
    # defaults are compared too (absent, the section is None and its rows were skipped:
    # tracing.service_name and sample_ratio were compared with nothing)
    doc = {**copy.deepcopy(BASE), "plans": {"p": {}},
           "identity_signature": {"secret_env": "KG_PROBE_SECRET"},
           "tracing": {"otlp_endpoint": "http://127.0.0.1:4318"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    config = load_config(tmp_path / "c.yaml")
    wrong, compared = [], 0
    for path, cell in reference_defaults():
        if not re.fullmatch(r"`[^`]*`|none|null", cell):
            continue   # required, "any", "the first plan": said in words
        node: object = config
        for part in path.split("."):
            if node is None:
                break
            node = (next(iter(node.values())) if isinstance(node, dict) else node) \
                if part == "NAME" else (node[0] if isinstance(node, tuple) else node)
            node = node if part == "NAME" else getattr(node, part)
        else:
            expected = None if cell in ("none", "null") else yaml.safe_load(cell.strip("`"))
            if isinstance(expected, list):
                expected = tuple(expected)
            compared += 1
            if node != expected:
                wrong.append((path, cell, node))
    assert compared > 40
    assert wrong == []
