"""What a release needs besides code: one version, written once and shown everywhere; the
licence text; a changelog entry; docs that stay inside the repository."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import yaml

from gateway import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_distribution_takes_its_version_from_the_package():
    assert version("keygate") == __version__
    assert "version = " not in (ROOT / "pyproject.toml").read_text().split("[project]")[1] \
        .split("[")[0].replace("dynamic", "")


def test_the_changelog_has_an_entry_for_this_version():
    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_kubernetes_image_tag_is_this_version():
    kustomization = yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())
    assert kustomization["images"][0]["newTag"] == __version__
    assert f"image: keygate:{__version__}" in (ROOT / "deploy/k8s/deployment.yaml").read_text()


def test_the_licence_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


MARKDOWN = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "SECURITY.md",
            ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The fragments a renderer (GitHub's) makes of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_readme_and_docs_link_only_inside_the_repository():
    for page in MARKDOWN:
        for target in LINK.findall(page.read_text()):
            assert not re.match(r"[a-z]+:", target), f"{page.name} links outside: {target}"
            path = target.split("#", 1)[0]
            if not path:
                continue
            resolved = (page.parent / path).resolve()
            assert resolved.is_relative_to(ROOT), f"{page.name} links outside: {target}"
            assert resolved.exists(), f"{page.name} links to a missing file: {target}"
            if "#" in target and resolved.suffix == ".md":
                assert target.split("#", 1)[1] in anchors(resolved), \
                    f"{page.name} links to a missing heading: {target}"


def test_a_vulnerability_has_a_concrete_private_way_to_be_reported():
    """docs/security.md said "report it privately to the maintainers" and not how: a reporter
    found no address, and a public issue was the one way the repository showed. SECURITY.md
    (where repository hosts and reporters look) names the channel, the host's private
    vulnerability reporting, and what to put in a report; the security model and the README
    point to it. It names no address of its own: the channel is the repository's."""
    policy = (ROOT / "SECURITY.md").read_text()
    said = " ".join(policy.split())
    assert "private vulnerability reporting" in said and "Report a vulnerability" in said
    assert "never in a public issue" in said and "keygate --version" in said
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.]+|https?://", policy), \
        "SECURITY.md names an address the project does not have"
    model = (ROOT / "docs" / "security.md").read_text().split("## Reporting a vulnerability")[1]
    assert "`SECURITY.md`, at the root of the repository" in " ".join(model.split())
    assert "(SECURITY.md)" in (ROOT / "README.md").read_text()


def test_readme_links_to_every_page_of_the_docs():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, page.name
    assert "shared/SPEC.md" not in readme


def test_the_operations_guide_lists_every_metric():
    from conftest import DOCUMENTED_METRICS
    guide = (ROOT / "docs" / "operations.md").read_text()
    assert [m for m in DOCUMENTED_METRICS if f"`{m}`" not in guide] == []


def test_every_metric_the_docs_and_deploy_files_name_is_one_keygate_exports():
    """The other way round: a `keygate_...` series named anywhere an operator reads (README,
    docs/, deploy/, the example config) must be one /metrics serves, or a query or alert
    copied from there finds nothing. Names that are not series are told apart by their
    context: nginx variables (`$keygate_...`) and Python names (`def`/`[keygate_...]`)."""
    from conftest import DOCUMENTED_METRICS
    served = set(DOCUMENTED_METRICS)
    served |= {f"{name}_{part}" for name, kind in DOCUMENTED_METRICS.items()
               if kind == "histogram" for part in ("bucket", "sum", "count")}
    pages = [ROOT / "README.md", ROOT / "config.example.yaml", ROOT / "Dockerfile",
             *sorted(p for p in (ROOT / "docs").rglob("*") if p.suffix in (".md", ".yaml",
                                                                           ".yml", ".json")),
             *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]
    unknown = []
    for page in pages:
        text = page.read_text()
        for match in re.finditer(r"(?<![\w$])keygate_[a-z0-9_]+", text):
            before = text[max(0, match.start() - 4):match.start()]
            if before.endswith(("def ", "async def ", "[")) or "$" in before[-1:]:
                continue
            if match.group(0) not in served:
                unknown.append(f"{page.relative_to(ROOT)}: {match.group(0)}")
    assert unknown == []


def test_the_security_model_names_the_digest_the_key_cache_is_keyed_by():
    """docs/security.md tells a reviewer what a process keeps of a verified secret; it must be
    the hash gateway.auth.token_digest computes (README.md says the same)."""
    import hashlib

    from gateway.auth import token_digest

    text = (ROOT / "docs" / "security.md").read_text()
    named = re.search(r"remembered in each process as an? ([A-Za-z0-9-]+) digest", text)
    assert named, "docs/security.md no longer says how a verified secret is remembered"
    algorithm = {"SHA-256": "sha256", "BLAKE2s-256": "blake2s", "BLAKE2s": "blake2s"}.get(
        named.group(1), named.group(1).lower())
    token = "kg_live_" + "A" * 50
    assert hashlib.new(algorithm, token.encode()).digest() == token_digest(token), named.group(0)


def test_every_table_row_in_the_docs_belongs_to_a_table():
    """A `| ... |` line renders as a table row only under a header and its `|---|` line, with
    no other line between the rows: a paragraph written into the middle of a table turns the
    rows after it into a line of literal pipes (the proxy's `internal_error` row did)."""
    stray = []
    for page in MARKDOWN:
        lines = page.read_text().splitlines()
        in_fence = False
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
            if in_fence or not line.startswith("|"):
                continue
            previous = lines[number - 2] if number > 1 else ""
            following = lines[number] if number < len(lines) else ""
            header = re.match(r"\|\s*:?-+", following) is not None
            if not (header or previous.startswith("|")):
                stray.append(f"{page.name}:{number}: {line[:60]}")
    assert stray == []


def test_ci_runs_exactly_the_readmes_test_command():
    """README's "Test it" says its block is exactly what `.ci/run` runs; an edit to one of
    them alone would make the README's way of testing differ from what CI proves."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Test it\n+```sh\n(.*?)```", readme, re.S).group(1)
    script = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in script.splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == block.strip().splitlines()


def test_the_readmes_module_sizes_are_the_packages():
    """README's "Where things are" said modules stay under 500 lines except store/embedded.py
    (~550); by then twelve were over 500, store/embedded.py was 629 lines and
    proxying/server.py 1,078. What it says now is checked against the package."""
    readme = (ROOT / "README.md").read_text()
    claim = re.search(r"most modules stay under (\d+) lines;\s+the\s+longest,\s+`([\w/]+\.py)`",
                      readme)
    assert claim, "README no longer says how long the package's modules are"
    limit, longest = int(claim.group(1)), claim.group(2)
    sizes = {str(p.relative_to(ROOT / "gateway")): len(p.read_text().splitlines())
             for p in (ROOT / "gateway").rglob("*.py")}
    assert sum(n < limit for n in sizes.values()) > len(sizes) / 2
    assert max(sizes, key=sizes.get) == longest, sorted(sizes.items(), key=lambda i: -i[1])[:3]


def test_the_readmes_map_of_the_package_names_every_module():
    """README's "Where things are" is where a newcomer finds a concern's home. proxying/tunnel.py
    (WebSocket), store/resp.py (the hot path's Redis client), overrides.py (method overrides)
    and four more were in no row of it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in re.findall(r"^\| (`.*)\|$", section, re.M):
        where, holds = row.split(" | ", 1)
        homes = re.findall(r"`([^`]+)`", where)
        folder = homes[0] if len(homes) == 1 and homes[0].endswith("/") else ""
        named |= set(homes) | {folder + m for m in re.findall(r"`([\w*]+\.py)`", holds)}
    modules = sorted(str(p.relative_to(ROOT / "gateway"))
                     for p in (ROOT / "gateway").rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    from fnmatch import fnmatch
    unnamed = [m for m in modules if not any(fnmatch(m, n) for n in named)
               and not m.startswith("cli/")]   # cli/: "one module per noun"
    assert unnamed == []
