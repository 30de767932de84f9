"""Packaging and deploy files agree with the code: ports, paths, env names, health endpoints,
metric names. Static and offline; the linters users run (hadolint, promtool, kubernetes-validate,
docker compose, kubectl kustomize) are run too when they are installed, and skipped otherwise.
The image's HEALTHCHECK command is run as the image runs it, against a real ``keygate serve``
on loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import DOCUMENTED_METRICS
from gateway.config import AdminConfig, ServerConfig, StoreConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "keygate.json"

PROXY_PORT = ServerConfig().port          # 8080
ADMIN_PORT = AdminConfig().port           # 8081
TOKEN_ENV = AdminConfig().token_env       # KEYGATE_ADMIN_TOKEN
CONFIG_PATH = "/etc/keygate/config.yaml"
DATA_DIR = "/var/lib/keygate"

# The documented metric names (gateway/metrics.py must export exactly these).
INTERFACE_METRICS = DOCUMENTED_METRICS


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in suffixes)


def documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomization() -> dict[str, Any]:
    (doc,) = documents(K8S / "kustomization.yaml")
    return doc


# Manifests shipped but left out of the kustomization until edited to the cluster: a
# NetworkPolicy applied as is cuts keygate off from a Redis, an upstream or an ingress
# controller that live elsewhere (off by default, as charts ship theirs).
OPT_IN = ("networkpolicy.yaml",)


def k8s_objects(opt_in: bool = True) -> dict[str, dict[str, Any]]:
    """Every object deploy/k8s makes, keyed ``Kind/name``: the kustomization's resources and
    the ConfigMaps it generates (named as written, without the hash kustomize adds), and
    with ``opt_in`` the opt-in manifests'."""
    found: dict[str, dict[str, Any]] = {}
    for name in [*kustomization()["resources"], *(OPT_IN if opt_in else ())]:
        for doc in documents(K8S / name):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    for generator in kustomization().get("configMapGenerator", []):
        data = {}
        for source in generator["files"]:
            key, _, file = source.rpartition("=")
            data[key or file] = (K8S / file).read_text()
        found[f"ConfigMap/{generator['name']}"] = {
            "apiVersion": "v1", "kind": "ConfigMap", "data": data,
            "metadata": {"name": generator["name"],
                         "labels": generator.get("options", {}).get("labels", {})}}
    return found


def k8s_manifests() -> list[Path]:
    """The manifest files under deploy/k8s (not the kustomization, nor the config file its
    ConfigMap is generated from)."""
    sources = {source.rpartition("=")[2]
               for generator in kustomization().get("configMapGenerator", [])
               for source in generator["files"]}
    return sorted(p for p in K8S.glob("*.yaml")
                  if p.name != "kustomization.yaml" and p.name not in sources)


def gateway_container() -> dict[str, Any]:
    (container,) = k8s_objects()["Deployment/keygate"]["spec"]["template"]["spec"]["containers"]
    return container


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages[-1]


def dockerfile_values(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def compose() -> dict[str, Any]:
    (doc,) = documents(DEPLOY / "docker-compose.yml")
    return doc


def dashboard_exprs() -> Iterator[str]:
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["definition"]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bkeygate_[a-z0-9_]+\b", expr))


def concrete(expr: str) -> str:
    """A Grafana query with its variables filled in, so PromQL tools can parse it."""
    return (expr.replace("$__rate_interval", "5m")
            .replace("$job", ".*").replace("$instance", ".*")
            .replace("$route", ".*").replace("$workspace", ".*"))


# --- everything parses ------------------------------------------------------------------------

@pytest.mark.parametrize("path", deploy_files(".yaml", ".yml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_under_deploy_parses(path):
    assert documents(path), f"{path} holds no YAML document"


@pytest.mark.parametrize("path", deploy_files(".json"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_json_file_under_deploy_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


# --- the container config ---------------------------------------------------------------------

def test_container_config_passes_keygate_validation(monkeypatch):
    config_module = pytest.importorskip("gateway.config")
    if not hasattr(config_module, "load_config"):
        pytest.skip("gateway.config.load_config does not exist yet")
    for name in ("KEYGATE_REDIS_URL", "KEYGATE_UPSTREAM_URL", "KEYGATE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    config = config_module.load_config(DEPLOY / "config.yaml")
    assert config.admin.host == "0.0.0.0", "Prometheus and probes must reach the admin listener"
    assert (config.server.port, config.admin.port) == (PROXY_PORT, ADMIN_PORT)
    assert config.admin.token_env == TOKEN_ENV
    assert config.store.data_dir == DATA_DIR
    assert config.store.redis_url == StoreConfig().redis_url == "embedded"


def test_container_config_takes_the_redis_url_from_the_environment(monkeypatch):
    from gateway.config import load_config
    monkeypatch.setenv("KEYGATE_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("KEYGATE_UPSTREAM_URL", "http://echo:5678")
    config = load_config(DEPLOY / "config.yaml")
    assert config.store.redis_url == "redis://redis:6379/0"
    assert [u.url for u in config.upstreams.values()] == ["http://echo:5678"]


# The one line deploy/k8s/config.yaml has of its own: no fallback to the embedded store.
IMAGE_REDIS_URL = "  redis_url: ${KEYGATE_REDIS_URL:-embedded}\n"
K8S_REDIS_URL = "  redis_url: ${KEYGATE_REDIS_URL}\n"


def test_k8s_configmap_carries_the_same_config_file_but_its_store_url():
    configmap = k8s_objects()["ConfigMap/keygate-config"]
    assert configmap["data"]["config.yaml"] == (K8S / "config.yaml").read_text()
    image = (DEPLOY / "config.yaml").read_text()
    assert image.count(IMAGE_REDIS_URL) == 1
    assert (K8S / "config.yaml").read_text() == image.replace(IMAGE_REDIS_URL, K8S_REDIS_URL)


@pytest.mark.parametrize("redis_url", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_k8s_config_refuses_to_start_without_a_redis_url(tmp_path, redis_url):
    """deploy/k8s runs 2 to 10 replicas (the HPA). Its config read
    ``${KEYGATE_REDIS_URL:-embedded}``: a Secret whose KEYGATE_REDIS_URL was empty (the
    kubectl line forgotten, a templating that wrote nothing) started every pod on an embedded
    Redis of its own, in an emptyDir: each replica its own keys, counters and revocations, a
    key created through one pod unknown to the others, quotas multiplied by the replica count,
    and every pod ready. Without a URL the pod must not start: `keygate config check` and
    `keygate serve` exit 1 with one line naming the variable (the pod's log, CrashLoopBackOff)."""
    keygate = str(Path(sys.executable).parent / "keygate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(KEYGATE_ADMIN_TOKEN="k8s-config-check", HOME=str(tmp_path))
    if redis_url is not None:
        env["KEYGATE_REDIS_URL"] = redis_url
    config = str(K8S / "config.yaml")
    for argv in (["config", "check", config], ["serve", "--config", config]):
        done = subprocess.run([keygate, *argv], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        said = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode == 1, (argv, done.returncode, said)
        assert len(said) == 1 and "KEYGATE_REDIS_URL" in said[0] \
            and "store.redis_url" in said[0], (argv, said)
    assert not list(tmp_path.rglob("*.aof")) and not list(tmp_path.rglob("*.rdb"))
    # and with a URL it checks (the same file, the same command)
    env["KEYGATE_REDIS_URL"] = "redis://redis.default.svc.cluster.local:6379/0"
    done = subprocess.run([keygate, "config", "check", config], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_k8s_config_check_the_operations_guide_prints_works_as_printed(tmp_path):
    """docs/operations.md, Changing the config, On Kubernetes, told the operator to check the
    edited file with `keygate config check deploy/k8s/config.yaml`, and called it "as shipped,
    the same file as `deploy/config.yaml`". On a workstation, where the pod's Secret variable
    KEYGATE_REDIS_URL is not set, that check always failed (`deploy/k8s/config.yaml:41:
    store.redis_url: environment variable KEYGATE_REDIS_URL is not set`), whatever the edit:
    the file is not the same, its store.redis_url has no fallback (on purpose, the test
    above), which the guide never said. An operator following it learned to ignore the check
    meant to stop a bad rollout. The guide prints the command with the variable set, and it
    passes as printed; it says how the two files differ."""
    text = (ROOT / "docs" / "operations.md").read_text()
    shown = re.findall(r"`([A-Z_]+=\S+ keygate config check deploy/k8s/config\.yaml)`", text)
    assert shown, "the guide no longer shows the k8s check, with its variable"
    assert "keygate config check deploy/k8s/config.yaml`" not in text.replace(shown[0], ""), \
        "the guide still shows the check without the variable somewhere"
    words = shlex.split(shown[0])
    assigned = dict(word.split("=", 1) for word in words[:words.index("keygate")])
    assert set(assigned) == {"KEYGATE_REDIS_URL"}, assigned
    argv = words[words.index("keygate") + 1:]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    environ.update(assigned, HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True,
                          text=True, timeout=60, cwd=str(ROOT), env=environ,
                          stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout) == (0, "ok: deploy/k8s/config.yaml\n"), done
    flat = " ".join(text.split())
    assert "the same file as `deploy/config.yaml`" not in flat
    assert "`${KEYGATE_REDIS_URL}`" in flat and "`deploy/config.yaml` but for" in flat, \
        "the guide does not say how deploy/k8s/config.yaml differs from deploy/config.yaml"


# --- Dockerfile -------------------------------------------------------------------------------

def test_dockerfile_exposes_the_default_ports_and_runs_keygate_serve():
    assert dockerfile_values("EXPOSE") == [f"{PROXY_PORT} {ADMIN_PORT}"]
    assert json.loads(dockerfile_values("ENTRYPOINT")[0]) == ["keygate"]
    assert json.loads(dockerfile_values("CMD")[0]) == ["serve", "--config", CONFIG_PATH]
    volumes = json.loads(dockerfile_values("VOLUME")[0])
    assert sorted(volumes) == sorted([str(Path(CONFIG_PATH).parent), DATA_DIR])


def test_dockerfile_healthcheck_hits_healthz_on_the_admin_port_without_curl():
    (healthcheck,) = dockerfile_values("HEALTHCHECK")
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in healthcheck
    assert "urllib.request" in healthcheck and "curl" not in healthcheck


@pytest.mark.parametrize("no_proxy", ["127.0.0.0/8", "localhost"])
async def test_the_image_healthcheck_ignores_an_http_proxy_set_in_the_container(
        tmp_path, redis_url, no_proxy):
    """Docker puts the client's configured proxy into every container's environment
    (~/.docker/config.json `proxies`: HTTP_PROXY/http_proxy and NO_PROXY; Docker's own example
    of noProxy is a CIDR such as 127.0.0.0/8), and corporate hosts set them as a rule. keygate
    itself is not affected (aiohttp ignores them), but a HEALTHCHECK through
    urllib.request.urlopen honours them: it sent GET http://127.0.0.1:8081/healthz to the
    proxy, which cannot reach the container's loopback, and Python's no_proxy matching knows
    neither CIDRs nor that localhost means 127.0.0.1. A healthy keygate was then reported
    unhealthy for good (`depends_on: condition: service_healthy` never holds, Swarm replaces
    the task). The check must go straight to the loopback. Run here as the image runs it,
    against a real ``keygate serve``."""
    import asyncio
    from conftest import free_port
    from served import Served, write_config
    (healthcheck,) = dockerfile_values("HEALTHCHECK")
    program, flag, code = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert program == "python" and flag == "-c" and f"127.0.0.1:{ADMIN_PORT}/" in code
    config, proxy_port, admin_port = write_config(tmp_path, redis_url=redis_url)
    code = code.replace(f"127.0.0.1:{ADMIN_PORT}/", f"127.0.0.1:{admin_port}/")
    dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    served = Served(config, proxy_port, admin_port)
    try:
        await served.ready()
        base = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code],
                                       env=env, capture_output=True, text=True, timeout=30)
        assert base.returncode == 0, base.stderr  # healthy without a proxy in the environment
        env.update({"HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy,
                    "HTTPS_PROXY": dead_proxy, "https_proxy": dead_proxy,
                    "NO_PROXY": no_proxy, "no_proxy": no_proxy})
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code],
                                         env=env, capture_output=True, text=True, timeout=30)
        served.close()  # and a keygate that is gone is reported unhealthy, proxy or not
        gone = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code],
                                       env=env, capture_output=True, text=True, timeout=30)
    finally:
        served.close()
    assert result.returncode == 0, (
        f"a running, healthy keygate is reported unhealthy by the image's HEALTHCHECK when the "
        f"container has HTTP_PROXY={dead_proxy} NO_PROXY={no_proxy}: "
        f"{result.stderr.strip().splitlines()[-1:]}")
    assert gone.returncode != 0


def test_dockerfile_final_stage_is_non_root_and_has_no_build_tools():
    (user,) = dockerfile_values("USER")
    assert user.split(":")[0] not in ("root", "0")
    final = " ".join(args for _, args in dockerfile_instructions())
    for tool in ("build-essential", "gcc", "apt-get install"):
        assert tool not in final
    assert "FROM" in DOCKERFILE.read_text() and " AS builder" in DOCKERFILE.read_text()


def test_dockerfile_copies_the_container_config_to_where_cmd_reads_it():
    copies = [args.split() for args in dockerfile_values("COPY")]
    assert ["deploy/config.yaml", CONFIG_PATH] in copies


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!gateway/", "!deploy/config.yaml"):
        assert needed in ignore


# --- docker compose ---------------------------------------------------------------------------

def keygate_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items()
            if name.startswith("keygate")}


def keygate_services_of(path: Path) -> dict[str, dict[str, Any]]:
    """The services of a compose file that run keygate: its image (or, built here, the
    Dockerfile)."""
    (doc,) = documents(path)
    return {name: svc for name, svc in doc["services"].items()
            if str(svc.get("image", "")).split(":")[0].rsplit("/", 1)[-1] == "keygate"}


def test_compose_runs_two_gateway_replicas_on_a_shared_redis():
    services = keygate_services()
    assert len(services) == 2
    for svc in services.values():
        assert TOKEN_ENV in svc["environment"]
        assert svc["environment"]["KEYGATE_REDIS_URL"].startswith("redis://redis:")
        assert f"./config.yaml:{CONFIG_PATH}:ro" in svc["volumes"]
        targets = {str(p).split(":")[-1] for p in svc["ports"]}
        assert targets == {str(PROXY_PORT), str(ADMIN_PORT)}
        admin_published = [str(p) for p in svc["ports"] if str(p).endswith(f":{ADMIN_PORT}")]
        assert all(p.startswith("127.0.0.1:") for p in admin_published), \
            "the admin API must not be published on every interface"


def _seconds(duration: str | int | float | None, default: float) -> float:
    """A compose duration ("45s", "1m30s", "90") in seconds."""
    if duration is None:
        return default
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)?", duration)
    return sum(float(n) * units[u or "s"] for n, u in parts)


DRAIN_ENV = "KEYGATE_DRAIN_SECONDS"
# Every compose file shipped: the Traefik example of verify-only mode
# (docs/deployment-modes.md) is one too.
COMPOSE_FILES = [DEPLOY / "docker-compose.yml", ROOT / "docs" / "verify" / "traefik-compose.yml"]


def drain_of(environment: dict[str, Any]) -> float:
    """The drain a manifest's environment sets: its KEYGATE_DRAIN_SECONDS, which it must set
    (in plain sight, beside the grace period it sizes: an operator raising the drain for long
    requests finds it there, and this test then sizes the grace period from the raised value,
    not from the default)."""
    from gateway.app import DRAIN_ENV as CODE_DRAIN_ENV, MAX_DRAIN_SECONDS, SHUTDOWN_TIMEOUT
    assert CODE_DRAIN_ENV == DRAIN_ENV
    assert DRAIN_ENV in environment, (
        f"{DRAIN_ENV} is not set: set it (default {SHUTDOWN_TIMEOUT}) beside the grace "
        f"period it sizes")
    value = float(str(environment[DRAIN_ENV]).strip())
    assert 0 <= value <= MAX_DRAIN_SECONDS
    return value


def stop_steps() -> dict[str, float]:
    """Each bounded step of keygate's stop after the listeners, in seconds at most, read from
    the code: every ``await`` in ``running_gateway``'s closing ``finally`` (a ``bounded()``
    call by the timeout it names; the others by the bound inside them), then the log's flush
    at exit. A step added there and not here fails: the grace periods are sized from this."""
    import ast
    import inspect
    import gateway.app as app
    from gateway.accesslog import ACCESS_LOG_CLOSE_TIMEOUT, LOG_FLUSH_TIMEOUT, BackgroundHandler
    from gateway.closing import CLOSE_STEP_TIMEOUT
    from gateway.tracing import SPAN_FLUSH_TIMEOUT
    assert inspect.signature(BackgroundHandler.flush).parameters["timeout"].default \
        == LOG_FLUSH_TIMEOUT  # what logging's atexit (and a worker's exit) waits for
    inside = {  # awaits bounded inside: Readiness.close's stop(), AccessLog.close's wait,
        "readiness.close()": CLOSE_STEP_TIMEOUT,  # the tracer's bounded() span flush
        "access.close()": ACCESS_LOG_CLOSE_TIMEOUT,
        "pipeline.tracer.close()": SPAN_FLUSH_TIMEOUT,
        "asyncio.gather(flushing, return_exceptions=True)": 0.0,  # a cancelled sleep loop
        "asyncio.gather(refreshing, return_exceptions=True)": 0.0,  # the same (and a read)
    }
    tree = ast.parse(inspect.getsource(app.running_gateway))
    (outer,) = [node for node in ast.walk(tree) if isinstance(node, ast.Try)
                and any(isinstance(n, ast.Yield) for stmt in node.body for n in ast.walk(stmt))]
    steps = {}
    for stmt in outer.finalbody:
        for node in ast.walk(stmt):
            if not isinstance(node, ast.Await):
                continue
            text = ast.unparse(node.value)
            call = node.value
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "bounded":
                steps[text] = float(getattr(app, call.args[1].id))
            else:
                assert text in inside, f"a stop step the grace periods do not count: {text}"
                steps[text] = float(inside[text])
    assert set(inside) <= set(steps), set(inside) - set(steps)
    steps["the log's flush at exit"] = LOG_FLUSH_TIMEOUT
    return steps


def stop_takes(drain: float) -> float:
    """The longest keygate's stop takes after SIGTERM with this drain: requests in flight
    (the drain, the proxy listener's shutdown_timeout), admin calls in flight
    (ADMIN_SHUTDOWN_TIMEOUT), then every step of ``stop_steps``, one after the other."""
    import ast
    import inspect
    import gateway.app as app
    source = inspect.getsource(app.start_listeners)
    bounds = [ast.unparse(k.value) for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Call) for k in node.keywords if k.arg == "shutdown_timeout"]
    assert bounds == ["drain_seconds()", "ADMIN_SHUTDOWN_TIMEOUT"], bounds
    return drain + app.ADMIN_SHUTDOWN_TIMEOUT + sum(stop_steps().values())


def test_the_stop_the_grace_periods_are_sized_for_is_keygates_worst_case():
    """The grace periods in deploy/ were sized for the drain + admin calls + the ledger's
    writes + the span flush (60 s with the default drain), but the stop has more bounded
    steps after those: the eviction look, the access log's last lines, the upstream pools,
    both store clients, the log's flush at exit (83 s in all). A stop that used them all was
    SIGKILLed after everything was written, exit 137, and that pages people. Each grace
    period's comment gives the sum it is sized from."""
    from gateway.app import SHUTDOWN_TIMEOUT
    assert stop_takes(SHUTDOWN_TIMEOUT) == 83
    for path, key in ((K8S / "deployment.yaml", "terminationGracePeriodSeconds"),
                      *((path, "stop_grace_period") for path in COMPOSE_FILES)):
        assert f"{stop_takes(SHUTDOWN_TIMEOUT):g} s" in comment_before(path, key), path.name
    assert f"up to {stop_takes(SHUTDOWN_TIMEOUT):g} s" in DOCKERFILE.read_text()


def comment_before(path: Path, key: str) -> str:
    """The comment lines right above the line that sets ``key:`` in a YAML file, joined."""
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
    above = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("#"):
            break
        above.insert(0, line.strip().lstrip("#").strip())
    return " ".join(above)


def test_the_grace_periods_say_to_raise_them_with_the_drain():
    """KEYGATE_DRAIN_SECONDS (0 to 3600) sets how long a stop lets requests in flight finish;
    the grace periods in deploy/ are sized for the value the manifests set. An operator who
    raises the drain for long requests and not the grace period has the kubelet (or docker)
    SIGKILL the requests the drain was raised for, with no word. The comment above each grace
    period, where that operator looks, names the variable and says to raise both."""
    for path, key in ((K8S / "deployment.yaml", "terminationGracePeriodSeconds"),
                      *((path, "stop_grace_period") for path in COMPOSE_FILES)):
        note = comment_before(path, key)
        assert DRAIN_ENV in note and "raise" in note.lower(), (path.name, note)


def test_compose_gives_keygate_the_time_its_documented_stop_takes():
    """`docker compose stop`, `down`, and the container's recreation by `up -d` after a
    rebuild or a config change send SIGTERM, then SIGKILL after the service's
    stop_grace_period: 10 s when unset, as it was in deploy/docker-compose.yml. keygate's stop
    lets requests in flight finish for up to the KEYGATE_DRAIN_SECONDS the service sets
    (SHUTDOWN_TIMEOUT, 30 s, when unset: docs/operations.md, Stopping), then admin calls (ADMIN_SHUTDOWN_TIMEOUT), then writes the usage counted while
    Redis was down (LEDGER_SHUTDOWN_TIMEOUT), and with tracing on sends its batched spans
    (SPAN_FLUSH_TIMEOUT). Under compose every answer still running 10 s after the signal was
    cut off unanswered, its access-log line and its take-back lost, and with on_store_error:
    open the counts of a Redis outage died with the process. Every compose file shipped: the
    Traefik example of docs/verify had no stop_grace_period at all."""
    services = {f"{path.name}: {name}": svc for path in COMPOSE_FILES
                for name, svc in keygate_services_of(path).items()}
    shipped = {p for top in (DEPLOY, ROOT / "docs", ROOT / "bench") for p in top.rglob("*")
               if re.search(r"compose[^/]*\.ya?ml$", p.name)} | set(ROOT.glob("*compose*.y*ml"))
    assert shipped == set(COMPOSE_FILES), "a compose file this test does not check"
    assert {name.split(":")[0] for name in services} == {p.name for p in COMPOSE_FILES}
    grace = {name: _seconds(svc.get("stop_grace_period"), 10.0)
             for name, svc in services.items()}
    needed = {name: stop_takes(drain_of(svc.get("environment") or {}))
              for name, svc in services.items()}
    assert grace and all(grace[name] >= needed[name] for name in grace), (
        f"stop_grace_period of the keygate services (s): {grace}; keygate's own stop takes up "
        f"to {needed} s with the {DRAIN_ENV} they set")
    # and a plain `docker stop` (10 s by default) is told how long to wait
    assert f"--stop-timeout {int(max(grace.values()))}" in DOCKERFILE.read_text()


def test_compose_redis_keeps_an_everysec_aof():
    command = compose()["services"]["redis"]["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "everysec"


def test_prometheus_scrapes_metrics_on_every_replicas_admin_port():
    (config,) = documents(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "keygate"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:{ADMIN_PORT}" for name in keygate_services()}


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    (provider,) = documents(DEPLOY / "grafana" / "provisioning" / "dashboards" / "keygate.yml")
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    assert (DEPLOY / "grafana" / "dashboards" / "keygate.json").is_file()
    (datasources,) = documents(DEPLOY / "grafana" / "provisioning" / "datasources"
                               / "prometheus.yml")
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# --- Kubernetes -------------------------------------------------------------------------------

def test_k8s_has_every_object_a_cluster_deploy_needs():
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in k8s_objects().values()}
    assert kinds >= {("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "ConfigMap"),
                     ("v1", "Secret"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
                     ("policy/v1", "PodDisruptionBudget"),
                     ("monitoring.coreos.com/v1", "ServiceMonitor"),
                     ("networking.k8s.io/v1", "NetworkPolicy")}


def test_k8s_probes_hit_readyz_and_healthz_on_the_admin_port():
    container = gateway_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"proxy": PROXY_PORT, "admin": ADMIN_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


# Seconds deploy/k8s lets a pod start: keygate listens (and /healthz answers) only once its
# Redis answers, which a Redis restarted on a large AOF or snapshot does only once loaded.
STARTUP_WINDOW = 600


def test_k8s_startup_probe_waits_out_a_redis_loading_its_data_set():
    """keygate waits while Redis answers LOADING and only then listens. The startupProbe gave
    a pod 60 s (2 s x 30): a Redis restarting on a few GB of AOF or snapshot takes minutes, so
    every pod started meanwhile (a node drained with its Redis, a rollout) was restarted by the
    kubelet in a loop, with back-off, and came up minutes after Redis had. The probe allows
    STARTUP_WINDOW s; a start that fails otherwise (config, credentials, no Redis at all) exits
    1 on its own, so the long window only delays noticing a start that hangs. The liveness and
    readiness probes wait for it, the Deployment's progress deadline outlasts it (else a
    rollout over a loading Redis is reported failed), and docs/operations.md says what to
    raise for a larger data set."""
    container = gateway_container()
    probe = container["startupProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "admin"}
    window = probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]
    assert window >= STARTUP_WINDOW, window
    assert probe["timeoutSeconds"] < probe["periodSeconds"]
    spec = k8s_objects()["Deployment/keygate"]["spec"]
    assert spec.get("progressDeadlineSeconds", 600) > window
    ops = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert "startupProbe" in ops and "failureThreshold" in ops and "progressDeadlineSeconds" in ops
    assert f"failureThreshold: {probe['failureThreshold']}" in " ".join(
        (K8S / "deployment.yaml").read_text().split())


def test_turning_on_admin_tls_says_what_must_switch_to_https():
    """With admin.tls the admin listener speaks HTTPS only: the kubelet's probes, the
    Prometheus scrapes and the image's HEALTHCHECK, all plain http by default, would then fail
    (pods never ready, restarted by the liveness probe, no metrics). The config's admin.tls
    line is where someone turns it on, so it names all of them."""
    config = (DEPLOY / "config.yaml").read_text()
    lines = config.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("# tls:")
              and lines[i - 1].strip().startswith("token_env:"))
    note = " ".join(line.strip().lstrip("#") for line in lines[at:at + 6]
                    if line.strip().startswith("#"))
    for needed in ("scheme: HTTPS", "servicemonitor", "prometheus.yml", "HEALTHCHECK"):
        assert needed.lower() in note.lower(), needed


def test_k8s_replicas_are_the_hpas_alone():
    """The HPA owns the Deployment's replica count: with ``spec.replicas`` in the manifest,
    every ``kubectl apply -k deploy/k8s`` (a config change, an image bump) set a Deployment the
    HPA had scaled to 8 back to 2 for a moment, terminating six loaded pods until the HPA
    scaled up again (Kubernetes' HPA docs: remove spec.replicas from the manifest)."""
    objects = k8s_objects()
    assert "replicas" not in objects["Deployment/keygate"]["spec"]
    hpa = objects["HorizontalPodAutoscaler/keygate"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "keygate" and hpa["minReplicas"] >= 2


def test_k8s_deployment_is_non_root_read_only_with_resources():
    deployment = k8s_objects()["Deployment/keygate"]
    container = gateway_container()
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert DATA_DIR in writable and "/tmp" in writable


def test_k8s_grace_period_outlasts_the_prestop_sleep_and_keygates_own_shutdown():
    """The kubelet's SIGKILL comes terminationGracePeriodSeconds after it starts the preStop
    hook, whose sleep counts against it. keygate then lets requests in flight finish for up
    to the KEYGATE_DRAIN_SECONDS the container sets (SHUTDOWN_TIMEOUT s when unset: a raised
    drain needs a raised grace period), then admin calls in flight for up to ADMIN_SHUTDOWN_TIMEOUT s
    (aiohttp's default, 60 s, was missing from the sum), writes usage counted while Redis
    was down for up to
    LEDGER_SHUTDOWN_TIMEOUT s, and with tracing on sends its batched spans for up to
    SPAN_FLUSH_TIMEOUT s: a grace period shorter than all of it SIGKILLs requests the docs
    promise to finish (and their access-log lines) in every rolling update."""
    spec = k8s_objects()["Deployment/keygate"]["spec"]["template"]["spec"]
    command = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    env = {e["name"]: e.get("value") for e in gateway_container()["env"]}
    needed = int(command[1]) + stop_takes(drain_of(env))
    assert spec["terminationGracePeriodSeconds"] >= needed, needed


def test_k8s_admin_token_comes_from_the_secret_and_config_from_the_configmap():
    objects = k8s_objects()
    container = gateway_container()
    env = {e["name"]: e for e in container["env"]}
    ref = env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]
    secret = objects[f"Secret/{ref['name']}"]
    assert ref["key"] in secret["stringData"]
    # applied as is, the Secret must grant nothing: an empty operator token closes the admin API
    # (every call 401, a warning at start), where a placeholder text would be a working operator
    # token that anyone who has read this repository knows
    assert secret["stringData"][ref["key"]] == "", "the committed operator token must be empty"
    (config_volume,) = [v for v in objects["Deployment/keygate"]["spec"]["template"]["spec"]
                        ["volumes"] if "configMap" in v]
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume["name"])
    configmap = objects[f"ConfigMap/{config_volume['configMap']['name']}"]
    assert str(Path(mount["mountPath"]) / next(iter(configmap["data"]))) == CONFIG_PATH
    assert container["args"] == ["serve", "--config", CONFIG_PATH]


def test_k8s_services_hpa_pdb_and_servicemonitor_select_the_gateway_pods():
    objects = k8s_objects()
    pod_labels = objects["Deployment/keygate"]["spec"]["template"]["metadata"]["labels"]
    services = [doc for doc in objects.values() if doc["kind"] == "Service"]
    for svc in services:
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["port"] for svc in services for p in svc["spec"]["ports"]}
    assert ports == {PROXY_PORT, ADMIN_PORT}
    pdb = objects["PodDisruptionBudget/keygate"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = objects["HorizontalPodAutoscaler/keygate"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "keygate"}
    assert hpa["spec"]["minReplicas"] >= 2
    monitor = objects["ServiceMonitor/keygate"]
    (endpoint,) = monitor["spec"]["endpoints"]
    (scraped,) = [svc for svc in services
                  if monitor["spec"]["selector"]["matchLabels"].items()
                  <= svc["metadata"]["labels"].items()]
    (port,) = [p for p in scraped["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert (port["port"], endpoint["path"]) == (ADMIN_PORT, "/metrics")


def _peers(rules: list[dict[str, Any]], port: int | str) -> list[dict[str, Any]]:
    """The peers (``from`` / ``to`` entries) of the rules that open ``port`` over TCP."""
    found = []
    for rule in rules:
        ports = rule.get("ports") or []
        if any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            found += rule.get("from", rule.get("to", []))
    return found


def _namespace_of(peer: dict[str, Any]) -> str | None:
    return peer.get("namespaceSelector", {}).get("matchLabels", {}).get(
        "kubernetes.io/metadata.name")


def test_k8s_network_policy_opens_the_proxy_to_the_ingress_and_the_admin_port_to_monitoring():
    """No NetworkPolicy came with deploy/k8s: any pod of the cluster could reach the admin
    listener (/admin/v1, guarded by the operator token alone, and /metrics, which names every
    workspace), and a compromised keygate pod could reach anything. The policy selects the
    gateway pods and lets in only the ingress controller's namespace on the proxy port and the
    monitoring namespace on the admin port (the kubelet's probes come from the node, which a
    NetworkPolicy never blocks; operators use `kubectl port-forward`); out only DNS, the Redis
    of the Secret's KEYGATE_REDIS_URL and the upstream of KEYGATE_UPSTREAM_URL, on their
    ports. kubernetes-validate checks its schema (test_kubernetes_validate_accepts_the_manifests)."""
    from urllib.parse import urlsplit
    objects = k8s_objects()
    (policy,) = [doc for doc in objects.values() if doc["kind"] == "NetworkPolicy"]
    pod_labels = objects["Deployment/keygate"]["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == pod_labels
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    ports = {p["name"]: p["containerPort"] for p in gateway_container()["ports"]}

    def opened(port_name: str) -> list[dict[str, Any]]:
        return _peers(spec["ingress"], port_name) + _peers(spec["ingress"], ports[port_name])
    # in: the proxy port from the ingress controller's namespace, the admin port from the
    # monitoring one; every rule names its port and its peers (none open to all)
    for rule in spec["ingress"]:
        assert rule.get("ports") and rule.get("from"), rule
        for port in rule["ports"]:
            assert port["port"] in ("proxy", "admin", PROXY_PORT, ADMIN_PORT), port
    assert {_namespace_of(p) for p in opened("proxy")} == {"ingress-nginx"}
    assert {_namespace_of(p) for p in opened("admin")} == {"monitoring"}
    # out: DNS (UDP and TCP) to kube-dns, the Redis and the upstream the manifests name
    for rule in spec["egress"]:
        assert rule.get("ports") and rule.get("to"), rule
    dns = [rule for rule in spec["egress"]
           if {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}
           == {("UDP", 53), ("TCP", 53)}]
    assert dns and all(_namespace_of(p) == "kube-system" for r in dns for p in r["to"])
    secret = objects["Secret/keygate"]["stringData"]
    env = {e["name"]: e.get("value") for e in gateway_container()["env"]}
    for url in (secret["KEYGATE_REDIS_URL"], env["KEYGATE_UPSTREAM_URL"]):
        parts = urlsplit(url)
        service, namespace = parts.hostname.split(".")[:2]
        peers = _peers(spec["egress"], parts.port)
        assert peers, f"no egress to {parts.hostname}:{parts.port}"
        assert all(_namespace_of(p) == namespace for p in peers), (url, peers)
        assert all(p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == service
                   for p in peers), (url, peers)
    opened_out = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
    assert opened_out == {53, urlsplit(secret["KEYGATE_REDIS_URL"]).port,
                          urlsplit(env["KEYGATE_UPSTREAM_URL"]).port}


def test_the_servicemonitor_scrapes_under_the_job_the_alerts_and_dashboard_select():
    """Every alert selects ``job="keygate"`` (the compose Prometheus's job name). The Prometheus
    Operator names a ServiceMonitor's job after the scraped Service, ``keygate-admin``, unless
    ``jobLabel`` names a Service label to take it from: on Kubernetes no alert ever fired."""
    objects = k8s_objects()
    monitor = objects["ServiceMonitor/keygate"]
    (scraped,) = [svc for svc in objects.values() if svc["kind"] == "Service"
                  and monitor["spec"]["selector"]["matchLabels"].items()
                  <= svc["metadata"]["labels"].items()]
    label = monitor["spec"].get("jobLabel")
    job = scraped["metadata"]["labels"][label] if label else scraped["metadata"]["name"]
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    jobs = {j for rule in group["rules"] for j in re.findall(r'job="([^"]*)"', rule["expr"])}
    assert jobs == {job}


def test_kustomization_lists_every_manifest():
    """Every file under deploy/k8s is the kustomization, a resource it lists, or the source of a
    ConfigMap it generates; the config's ConfigMap is generated (a hash of the file in its name,
    so that a change rolls the pods), never a plain resource."""
    doc = kustomization()
    generated = {source.rpartition("=")[2] for generator in doc.get("configMapGenerator", [])
                 for source in generator["files"]}
    assert set(doc["resources"]) == {p.name for p in k8s_manifests()} - set(OPT_IN)
    # each opt-in is named in the kustomization, as the line to uncomment
    text = (K8S / "kustomization.yaml").read_text()
    assert all(f"  # - {name}" in text for name in OPT_IN), text
    assert {p.name for p in K8S.iterdir()} == set(doc["resources"]) | generated | {
        "kustomization.yaml", *OPT_IN}
    assert not [r for r in doc["resources"]
                if any(d.get("kind") == "ConfigMap" for d in documents(K8S / r))]


# --- Grafana dashboard ------------------------------------------------------------------------

def test_dashboard_uses_only_the_agreed_metric_names():
    allowed = set()
    for name, kind in INTERFACE_METRICS.items():
        allowed.add(name)
        if kind == "histogram":
            allowed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used and used <= allowed, f"not in INTERFACES.md: {sorted(used - allowed)}"


def test_agreed_metric_names_are_the_ones_the_code_exports():
    from gateway.metrics import Metrics
    metrics = Metrics()   # the usage gauges are served after the registry's exposition
    exported = {metric.name + ("_total" if metric.type == "counter" else ""): metric.type
                for metric in [*metrics.registry.collect(), *metrics.usage.describe()]
                if metric.name.startswith("keygate_")}
    assert exported == INTERFACE_METRICS


def exported_labels() -> dict[str, set[str]]:
    """Each keygate metric's label names as the code exports them (``workspace`` on the
    request counter with ``metrics.workspace_labels``)."""
    from gateway.metrics import Metrics
    metrics = Metrics(workspace_labels=True)
    found = {metric.name + ("_total" if metric.type == "counter" else ""): set()
             for metric in metrics.usage.describe()}
    for name in found:
        found[name] = {"workspace"}
    for attr in vars(metrics).values():
        if getattr(attr, "_name", "").startswith("keygate_"):
            found[attr._name + ("_total" if attr._type == "counter" else "")] = \
                set(attr._labelnames)
    return found


def test_the_alerts_and_the_dashboard_select_only_labels_the_metrics_have():
    """promtool's unit tests feed the alerts series written by hand with the alerts' own
    labels, and the dashboard's queries are only parsed: a label the code does not export (or
    no longer does: a renamed `status_class`, `reason`, `code`) passed every check, and such an
    alert never fires, such a panel stays empty. Every label an alert or a panel selects or
    groups by is one the metric has (or `job`, `instance`, `le`, which Prometheus adds)."""
    labels = exported_labels()
    assert set(labels) == set(INTERFACE_METRICS)
    exprs = list(dashboard_exprs())
    exprs += [rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
              for rule in group["rules"]]
    added = {"job", "instance", "le"}

    def base(name: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", name)
    wrong = []
    for expr in exprs:
        for match in re.finditer(r"\b(keygate_[a-z0-9_]+)\{([^}]*)\}", expr):
            metric = base(match.group(1))
            selected = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(2)))
            wrong += [(metric, label) for label in selected - added - labels[metric]]
        for names in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used = {name.strip() for name in names.split(",") if name.strip()}
            known = added.union(*(labels.get(base(m), set()) for m in metric_names(expr)))
            wrong += [(expr[:60], name) for name in used - known]
    assert len(exprs) > 20
    assert wrong == []


def test_dashboard_shows_routes_statuses_failures_latency_and_monthly_usage():
    exprs = list(dashboard_exprs())
    joined = "\n".join(exprs)
    assert "sum by (route, status_class) (rate(keygate_requests_total" in joined
    assert "sum by (reason) (rate(keygate_auth_failures_total" in joined
    assert re.search(r"histogram_quantile\(0\.99, sum by \(le[^)]*\) "
                     r"\(rate\(keygate_request_duration_seconds_bucket", joined)
    assert any("keygate_workspace_month_requests" in e and "keygate_workspace_month_limit" in e
               for e in exprs), "usage vs limit needs both series in one query"


def test_dashboard_panels_have_unique_ids_and_a_datasource():
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["type"] == "prometheus" and panel["targets"]
    assert board["uid"] and board["title"]


# --- the tools users run, when installed ------------------------------------------------------

def run(cmd: list[str], cwd_override: Path | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          cwd=cwd_override or ROOT, **kwargs)


def tool(name: str) -> str:
    """A tool on PATH, or one the test extra installs beside this interpreter (hadolint,
    kubernetes-validate: the suite may run without the venv's bin on PATH)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_hadolint_accepts_the_dockerfile():
    result = run([tool("hadolint"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config():
    result = run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def test_alert_rules_cover_store_5xx_quota_and_argon2_with_agreed_metrics():
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = {rule["alert"]: rule for rule in group["rules"]}
    allowed = {"up"}
    for name, kind in INTERFACE_METRICS.items():
        allowed |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                             if kind == "histogram" else set())
    for name, rule in rules.items():
        assert metric_names(rule["expr"]) <= allowed, (name, metric_names(rule["expr"]))
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    joined = " ".join(rule["expr"] for rule in rules.values())
    for metric in ("keygate_store_errors_total", 'status_class="5xx"',
                   "keygate_workspace_month_limit", "keygate_argon2_verifications_total"):
        assert metric in joined


def test_every_dropped_line_counter_has_an_alert_unit_tested_firing():
    """keygate_access_log_dropped_total counts access-log lines lost when stderr is full or
    slow: the log of who was let through, with what key, misses requests that were served.
    Nothing alerted on it (its application-log twin had an alert), so a stalled log collector
    lost the access log for as long as nobody looked at the counter. Every counter of lines
    dropped has an alert, and every alert a promtool unit test in which it fires (and with
    the labels it fires with)."""
    (group,) = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = {rule["alert"]: rule for rule in group["rules"]}
    dropped = {name for name in INTERFACE_METRICS if name.endswith("_dropped_total")}
    assert "keygate_access_log_dropped_total" in dropped
    for metric in dropped:
        assert any(metric in metric_names(rule["expr"]) for rule in rules.values()), metric
    tests = yaml.safe_load((ALERTS.parent / "alerts-test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    assert set(rules) - fired == set(), "alerts no unit test sees fire"


def test_compose_prometheus_loads_the_alert_rules():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (compose,) = documents(DEPLOY / "docker-compose.yml")
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_promtool_checks_the_alert_rules():
    result = run([tool("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass():
    result = run([tool("promtool"), "test", "rules", "alerts-test.yml"],
                 cwd_override=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path):
    promtool = tool("promtool")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"keygate:dashboard_query_{i}", "expr": concrete(expr)}
        for i, expr in enumerate(dashboard_exprs()) if not expr.startswith("label_values(")]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_accepts_the_manifests():
    validate = tool("kubernetes-validate")
    manifests = [str(p) for p in k8s_manifests()]
    # and the ingress-nginx example docs/deployment-modes.md ships for verify-only mode
    manifests.append(str(ROOT / "docs" / "verify" / "ingress-nginx.yaml"))
    result = run([validate, "--strict", "--quiet", *manifests])
    assert result.returncode == 0, result.stdout + result.stderr


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("neither docker-compose nor the docker compose plugin is installed")




@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_accepts_the_compose_file(path):
    env = dict(os.environ, KEYGATE_ADMIN_TOKEN="compose-config-check")
    result = run([*compose_command(), "-f", str(path), "config", "-q"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_config_change_applied_with_kubectl_apply_k_reaches_the_running_pods(tmp_path):
    """deploy/k8s is applied with `kubectl apply -k deploy/k8s` (kustomization.yaml). A config
    change is an edit of the config file the ConfigMap carries; applied, it used to change
    nothing in the Deployment's pod template (the ConfigMap kept its name, no checksum
    annotation), so no rollout happened. The kubelet rewrites the mounted file a minute or so
    later, but keygate reads it only at start or on a reload (SIGHUP, POST /admin/v1/reload)
    that nothing sends; the only admin URL the manifests give, the keygate-admin Service,
    reaches one random pod per call. The running replicas kept the old routes, plans and roles
    while every pod started later (an HPA scale-up, a restart) took the new file: replicas
    answered the same request differently, indefinitely and silently. A change to the config
    must change the pod template (configMapGenerator's name hash) so the Deployment rolls."""
    kubectl = tool("kubectl")

    def built(k8s: Path) -> dict:
        result = run([kubectl, "kustomize", str(k8s)])
        assert result.returncode == 0, result.stderr
        (deployment,) = [d for d in yaml.safe_load_all(result.stdout)
                         if d and d["kind"] == "Deployment"]
        return deployment["spec"]["template"]

    before = tmp_path / "before"
    shutil.copytree(DEPLOY, before)
    after = tmp_path / "after"
    shutil.copytree(DEPLOY, after)
    # the operator's change: a new plan limit, in config.yaml and so in the ConfigMap
    # (wherever the manifests take the file from: every copy of it under deploy/)
    changed = []
    for path in sorted(after.rglob("*")):
        if path.is_file() and "monthly_requests: 100000" in (text := path.read_text()):
            path.write_text(text.replace("monthly_requests: 100000", "monthly_requests: 200000"))
            changed.append(path.relative_to(after))
    assert Path("config.yaml") in changed, changed
    assert built(after / "k8s") != built(before / "k8s"), (
        "after a config change, `kubectl apply -k deploy/k8s` leaves the Deployment's pod "
        "template as it was: no pod restarts, and nothing reloads the running ones")


def test_kustomize_builds_the_manifests_with_this_versions_image():
    """`kubectl apply -k deploy/k8s` is how the manifests are applied (kustomization.yaml):
    kustomize must build them (every resource found, no duplicate, the image tag set), which
    kubernetes-validate, reading the files one by one, does not try."""
    from gateway import __version__
    kubectl = tool("kubectl")
    result = run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, result.stdout + result.stderr
    built = {f"{doc['kind']}/{doc['metadata']['name']}": doc
             for doc in yaml.safe_load_all(result.stdout) if doc}
    # the generated ConfigMap's name carries its content's hash, and the Deployment names it so
    (configmap,) = [name for name in built if name.startswith("ConfigMap/keygate-config-")]
    assert set(built) - {configmap} | {"ConfigMap/keygate-config"} == set(k8s_objects(False))
    assert built[configmap]["data"] == k8s_objects()["ConfigMap/keygate-config"]["data"]
    spec = built["Deployment/keygate"]["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert f"ConfigMap/{volume['configMap']['name']}" == configmap
    (container,) = spec["containers"]
    assert container["image"] == f"keygate:{__version__}"


# --- the image's HTTPS recipe, with certbot's files ------------------------------------------

def dockerfile_tls_recipe() -> tuple[str, str, str, str, str | None]:
    """What the Dockerfile's comment tells an operator to do for HTTPS listeners: the mount of
    its ``docker run`` line (host path, container path), the config's cert_file and key_file,
    and the certbot deploy hook, if it gives one."""
    lines = [line[1:].strip() for line in DOCKERFILE.read_text().splitlines()
             if line.startswith("#")]
    at = next(i for i, line in enumerate(lines) if line.startswith("HTTPS listeners"))
    block = " ".join(lines[at:at + 14])
    (mount,) = re.findall(r"docker run [^\n]*?-v (\S+):(\S+):ro", block)[:1]
    cert = re.search(r"cert_file: ([^,}\s]+)", block).group(1)
    key = re.search(r"key_file: ([^,}\s]+)", block).group(1)
    hook = re.search(r"--deploy-hook '([^']+)'", block)
    return mount[0], mount[1], cert, key, hook.group(1) if hook else None


def test_the_images_https_recipe_works_with_the_files_certbot_makes(tmp_path):
    """The Dockerfile's HTTPS example is certbot's (fullchain.pem, privkey.pem). It mounted
    /etc/letsencrypt/live/NAME into the container: certbot's files there are relative links
    into ../../archive/NAME, which lead nowhere inside the container, and its key, like the
    live/ and archive/ folders, is root's alone, where keygate runs as uid 10001. Applied as
    written, keygate could not start (`server.tls.cert_file: ... does not exist`).
    Here certbot's layout is made as certbot makes it (folders 0700, the key 0600, relative
    links); the recipe's deploy hook is run as certbot runs it (as root, RENEWED_LINEAGE set;
    the reload it ends with is not: no Docker engine here), the recipe's mount is made a real
    bind mount in a mount namespace of its own, and ``keygate config check`` runs on a config
    naming the files as the recipe does. Every path is under a
    scratch folder (the host's) and another (the container's); the files are read as uid
    10001 too."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "setpriv", "openssl")):
        pytest.skip("needs root, unshare, setpriv and openssl (a bind mount, a read as uid "
                    "10001, a certificate)")
    if run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("mount namespaces are not available here")
    import tempfile
    source, target, cert, key, hook = dockerfile_tls_recipe()
    # the container's root: in /tmp, whose other users may pass through it, unlike tmp_path's
    # parents (uid 10001 must reach the files through it, as through the container's /)
    container = Path(tempfile.mkdtemp(prefix="kg-container-", dir="/tmp"))
    try:
        _check_tls_recipe(tmp_path, tmp_path / "host", container, source, target, cert, key,
                          hook)
    finally:
        shutil.rmtree(container, ignore_errors=True)


def _check_tls_recipe(tmp_path: Path, host: Path, container: Path, source: str, target: str,
                      cert: str, key: str, hook: str | None) -> None:
    from harness import openssl
    # certbot's layout for api.example.com, as certbot leaves it
    le = host / "etc" / "letsencrypt"
    archive, live = le / "archive" / "api.example.com", le / "live" / "api.example.com"
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-subj", "/CN=api.example.com", "-keyout", str(archive / "privkey1.pem"),
            "-out", str(archive / "fullchain1.pem"))
    os.chmod(archive / "privkey1.pem", 0o600)
    os.chmod(archive / "fullchain1.pem", 0o644)
    for name in ("fullchain", "privkey"):
        (live / f"{name}.pem").symlink_to(f"../../archive/api.example.com/{name}1.pem")
    for folder in (le / "archive", le / "live"):
        os.chmod(folder, 0o700)
    for folder in (host, host / "etc", le):
        os.chmod(folder, 0o755)

    def on_host(path: str) -> str:  # an absolute path of the recipe, in the host's scratch
        return re.sub(r"(?<![\w$/.-])/(etc|srv|opt|var)/", lambda m: f"{host}/{m.group(1)}/",
                      path)

    if hook is not None:
        steps = [step.strip() for step in hook.split("&&")]
        kept = " && ".join(s for s in steps if not s.startswith("docker "))
        done = run(["bash", "-c", on_host(kept)],
                   env=dict(os.environ, RENEWED_LINEAGE=str(live)))
        assert done.returncode == 0, done.stderr
    mount_from = Path(on_host(source))
    assert mount_from.is_dir(), f"the recipe mounts {source}, which is not there: {mount_from}"
    mount_at = container / target.lstrip("/")
    mount_at.mkdir(parents=True)
    os.chmod(container, 0o755)
    config = tmp_path / "keygate.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"tls": {"cert_file": str(container / cert.lstrip("/")),
                           "key_file": str(container / key.lstrip("/"))}},
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "routes": [{"path": "/**", "upstream": "api", "public": True}]}))
    # keygate's own check of the files (they exist, are PEM, the key matches), then a read of
    # each as the image's user (this test's Python is not one another user may run)
    keygate = str(Path(sys.executable).parent / "keygate")
    files = " ".join(shlex.quote(str(container / path.lstrip("/"))) for path in (cert, key))
    check = (f"mount --bind -o ro {shlex.quote(str(mount_from))} {shlex.quote(str(mount_at))}"
             f" && {keygate} config check {shlex.quote(str(config))}"
             f" && setpriv --reuid 10001 --regid 10001 --clear-groups cat {files} >/dev/null")
    done = run(["unshare", "-m", "sh", "-c", check])
    assert done.returncode == 0 and "ok:" in done.stdout, (
        f"the Dockerfile's HTTPS recipe ({source} mounted at {target}), with certbot's files: "
        f"{(done.stdout + done.stderr).strip()}")
