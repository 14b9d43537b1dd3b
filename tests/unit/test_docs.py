"""The guides hold when followed: links resolve, snippets parse, and the scripts they run do what they say.

Issue 15 items 6 and 7: the README is a front page with the guides beside it (k8s/README.md, bench/README.md,
docs/), every snippet runnable as written. The README's quickstart is run against a live stack in test_readme.py.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from extproc import cli as extproc_cli
from extproc import metrics
from gateway.cli import envoy_binary
from settings import SETTINGS
from tests.integration.conftest import die_with_parent, free_port, terminate

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GUIDES = [README, ROOT / "k8s" / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEMPLATE = ROOT / "k8s" / "shimmy-serving-template.yaml"
STANDALONE_EXAMPLE = ROOT / "envoy" / "standalone.example.yaml"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose = FENCE.sub("", path.read_text())
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose, re.M)}


def relative_links(path: Path) -> list[str]:
    prose = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(prose) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


# ------------------------------------------------------------------------------------------------------------ links


def test_the_guides_exist() -> None:
    for guide in GUIDES[:3]:
        assert guide.is_file(), guide
    assert {p.name for p in GUIDES} >= {"architecture.md", "errors.md", "dependencies.md", "real-shimmy.md",
                                          "standalone.md"}


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(guide: Path) -> None:
    broken = []
    for target in relative_links(guide):
        file_part, _, anchor = target.partition("#")
        linked = (guide.parent / file_part).resolve() if file_part else guide
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, broken


def test_the_readme_links_every_guide() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert set(GUIDES[1:]) <= linked


def test_the_readme_is_a_front_page() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < 250, len(lines)


def test_the_serving_template_points_at_the_deployment_guide() -> None:
    assert "deployment guide: k8s/README.md" in TEMPLATE.read_text()
    assert (ROOT / "k8s" / "README.md").is_file()


# --------------------------------------------------------------------------------------------------------- snippets


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bash_block_parses(guide: Path) -> None:
    for body in blocks(guide, "bash"):
        result = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert result.returncode == 0, f"{result.stderr}\n{body}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_compiles_and_names_nothing_undefined(guide: Path, tmp_path: Path) -> None:
    """Compiles, and ruff's undefined-name check passes: a snippet using shell variables as Python names fails."""
    snippets = blocks(guide, "python")
    for i, body in enumerate(snippets):
        compile(body, f"{guide.name}[python {i}]", "exec")
        (tmp_path / f"snippet_{i}.py").write_text(body)
    if snippets:
        result = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821,F401",
                                 str(tmp_path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


# ------------------------------------------------------------------------------------------------ deployment guide


def test_every_docker_build_passes_the_model_url_with_its_checksum() -> None:
    """A checksum without its URL checks the default file against another file's sum: the build fails."""
    builds = [b for b in blocks(ROOT / "k8s" / "README.md", "bash") if "docker build" in b]
    assert builds
    for body in builds:
        if "MODEL_SHA256" in body:
            assert '--build-arg MODEL_URL="$MODEL_URL"' in body, body


def test_the_guide_states_the_templates_resources() -> None:
    template = yaml.safe_load(TEMPLATE.read_text())
    container = yaml.safe_load(template["spec"]["template"]["spec"].replace("{{", "").replace("}}", ""))
    resources = container["predictor"]["containers"][0]["resources"]
    req, lim = resources["requests"], resources["limits"]
    def memory(value: str) -> str:
        return re.sub(r"^(\d+)(\w+)$", r"\1 \2", value)  # 4Gi -> 4 Gi

    stated = f"requests {req['cpu']} CPU / {memory(req['memory'])}, limits {lim['cpu']} CPU / {memory(lim['memory'])}"
    guide = " ".join((ROOT / "k8s" / "README.md").read_text().split())
    assert guide.count(stated) >= 2, stated
    assert f"on {lim['cpu']} vCPUs" not in guide  # the pod never has more than its plan's node


class _TokenEndpoint(http.server.BaseHTTPRequestHandler):
    """XSUAA's /oauth/token as the test wants it: `answers` maps a client id to (status, JSON body)."""

    answers: dict[str, tuple[int, dict[str, str]]] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        client = base64.b64decode(self.headers["authorization"].split()[1]).decode().partition(":")[0]
        status, body = self.answers[client]
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def token_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.mark.skipif(shutil.which("jq") is None or shutil.which("curl") is None, reason="needs jq and curl")
@pytest.mark.parametrize(
    ("client", "answer", "error"),
    [
        ("good", (200, {"access_token": "tok'en $(x)", "token_type": "bearer"}), None),
        ("wrong", (401, {"error": "unauthorized"}), "the token request to"),
        ("empty", (200, {"error": "no token here"}), "holds no access_token"),
    ],
)
def test_aicore_env_exports_a_token_or_fails_loudly(
    token_endpoint: str, tmp_path: Path, client: str, answer: tuple[int, dict[str, str]], error: str | None
) -> None:
    """Step 3: an empty or refused token stops the guide with a message, never exit 0 with TOKEN=''."""
    _TokenEndpoint.answers = {client: answer}
    key = tmp_path / "aicore-key.json"
    key.write_text(json.dumps({"url": token_endpoint + "/", "clientid": client, "clientsecret": "s",
                               "serviceurls": {"AI_API_URL": "https://api.example.test"}}))
    script = f'AICORE=$("{ROOT}/scripts/aicore-env.sh" "{key}") && eval "$AICORE" && printf "%s|%s|%s" ' \
             '"$AI_API_URL" "$TOKEN" "$RG"'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                            timeout=60)
    if error is None:
        assert result.returncode == 0, result.stderr
        assert result.stdout == "https://api.example.test|tok'en $(x)|default"
    else:
        assert result.returncode != 0 and result.stdout == ""
        assert error in result.stderr, result.stderr


def test_aicore_env_refuses_a_key_without_a_field(tmp_path: Path) -> None:
    key = tmp_path / "aicore-key.json"
    key.write_text(json.dumps({"url": "http://127.0.0.1:9", "clientid": "c"}))
    result = subprocess.run([str(ROOT / "scripts" / "aicore-env.sh"), str(key)], capture_output=True, text=True)
    assert result.returncode != 0 and result.stdout == ""
    assert "has no .clientsecret" in result.stderr


# ------------------------------------------------------------------------------------------------ standalone recipe


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI makes the certificates")
def test_the_dev_cert_script_makes_certificates_the_example_accepts(tmp_path: Path) -> None:
    out = tmp_path / "dev-certs"
    result = subprocess.run([str(ROOT / "scripts" / "make-dev-certs.sh"), str(out)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    files = {p.name for p in out.iterdir()}
    assert files == {"ca.crt", "ca.key", "server.crt", "server.key", "envoy-client.crt", "envoy-client.key"}

    def openssl(*args: str) -> str:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=True)
        return done.stdout

    assert "server.crt: OK" in openssl("verify", "-CAfile", str(out / "ca.crt"), "-purpose", "sslserver",
                                       str(out / "server.crt"))
    assert "envoy-client.crt: OK" in openssl("verify", "-CAfile", str(out / "ca.crt"), "-purpose", "sslclient",
                                             str(out / "envoy-client.crt"))
    # The names the example's extproc cluster checks (`sni`, the SAN matcher) are in the server certificate, and
    # the files it names exist under the placeholder directory's names.
    example = STANDALONE_EXAMPLE.read_text()
    sni = re.search(r"^\s*sni: (\S+)$", example, re.M)
    assert sni
    assert f"DNS:{sni.group(1)}" in openssl("x509", "-in", str(out / "server.crt"), "-noout", "-ext",
                                            "subjectAltName")
    for name in re.findall(r"/etc/shimmy-gateway/tls/([\w.-]+)", example):
        assert name in files, name
    assert all((p.stat().st_mode & 0o077) == 0 for p in out.glob("*.key"))


def _terminal_commands(guide: str) -> dict[str, str]:
    """The mTLS recipe's blocks, by what they start with."""
    recipe = guide[guide.index("## Try it on a laptop"): guide.index("## Plaintext TCP")]
    found = {}
    for body in re.findall(r"^```bash\n(.*?)^```", recipe, re.S | re.M):
        key = next(k for k in ("make-dev-certs", "shimmy-emulator", "shimmy-extproc", "envoy -c", "curl") if k in body)
        found[key] = body
    return found


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None, reason="needs openssl and curl")
@pytest.mark.stack
def test_the_mtls_recipe_works_as_written(tmp_path: Path) -> None:
    """docs/standalone.md's four terminals, run as written from a copy of the repository root, on free ports:
    the certificates from the script, the emulator, the processor over mTLS, Envoy with the example; then the
    guide's curl calls answer 200 through Envoy and the processor."""
    for name in ("scripts", "envoy"):
        (tmp_path / name).symlink_to(ROOT / name)
    blocks_by_key = _terminal_commands((ROOT / "docs" / "standalone.md").read_text())
    ports = {"8000": free_port(), "9901": free_port(), "50051": free_port(), "8080": free_port()}

    def local(command: str) -> str:
        """The guide's ports and /tmp paths first, on its own text only: the paths put in after them (the checkout's,
        which may itself live under /tmp or hold a port's digits) stay as they are."""
        command = re.sub(r"\b(8000|9901|50051|8080)\b", lambda m: str(ports[m.group(1)]), command)
        command = command.replace("/tmp/", f"{tmp_path}/")
        command = command.replace(".venv/bin/shimmy-emulator", f"{sys.executable} -m shimmy")
        command = command.replace(".venv/bin/shimmy-extproc", f"{sys.executable} -m extproc.cli")
        return command.replace(".venv/bin/envoy", envoy_binary())

    # The fixed engine, as in every stack the tests start: a real model on loaded cores outlasts the probes below.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HEALTH_INTERVAL_S": "0.5", "EMULATOR_ENGINE": "fixed"}
    subprocess.run(["bash", "-euc", blocks_by_key["make-dev-certs"]], cwd=tmp_path, check=True, env=env, timeout=60)
    envoy_block = blocks_by_key["envoy -c"].splitlines()
    subprocess.run(["bash", "-euc", local(envoy_block[0])], cwd=tmp_path, check=True, env=env, timeout=60)
    config = next(tmp_path.glob("standalone-*.yaml"))
    config.write_text(re.sub(r"port_value: (8000|9901|50051|8080)\b", lambda m: f"port_value: {ports[m.group(1)]}",
                             config.read_text()))
    children = []
    try:
        for command in (blocks_by_key["shimmy-emulator"], blocks_by_key["shimmy-extproc"], envoy_block[1]):
            with (tmp_path / f"{len(children)}.log").open("wb") as log:
                children.append(subprocess.Popen(["bash", "-c", "exec " + local(command).replace("\\\n", " ")],
                                                 cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 preexec_fn=die_with_parent))
        health = f"http://127.0.0.1:{ports['8000']}/health"
        chat = f"http://127.0.0.1:{ports['8000']}/v1/chat/completions"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # The processor's probe, then Envoy's own health check of Shimmy (every 2 s; until its first pass,
            # a generation is 503 backend_unavailable with Retry-After, as the example's shimmy cluster says).
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(health, timeout=2).status_code == 200 and httpx.post(
                        chat, json={"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}]},
                        timeout=10).status_code == 200:
                    break
            assert all(c.poll() is None for c in children), [p.read_text() for p in tmp_path.glob("*.log")]
            time.sleep(0.1)
        calls = 'curl() { command curl --fail-with-body "$@"; }\nset -euo pipefail\n' + local(blocks_by_key["curl"])
        result = subprocess.run(["bash", "-c", calls], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr + "".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert '"status":"healthy"' in result.stdout and '"object":"chat.completion"' in result.stdout
        assert "(TLS)" in (tmp_path / "1.log").read_text()  # the processor really served over TLS
    finally:
        for child in children:
            terminate(child)


def test_the_standalone_rewrites_give_configs_envoy_accepts(tmp_path: Path) -> None:
    """The plaintext and unix-socket variants: each snippet, run as written (its /tmp output moved to tmp_path),
    writes a config that the envoy binary's own validation accepts."""
    snippets = [b.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
                for b in blocks(ROOT / "docs" / "standalone.md", "bash") if "<<'EOF'" in b]
    assert len(snippets) == 2
    for snippet in snippets:
        [written] = re.findall(r'open\("(/tmp/[\w.-]+)", "w"\)', snippet)
        target = tmp_path / Path(written).name
        subprocess.run([sys.executable, "-c", snippet.replace(written, str(target))], cwd=ROOT, check=True)
        config = yaml.safe_load(target.read_text())
        extproc = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extproc")
        assert "transport_socket" not in extproc
        result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(target), "--disable-hot-restart"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_standalone_guide_names_exactly_the_settings_the_processor_reads() -> None:
    """Not "every EXTPROC_ setting": the guide lists what `shimmy-extproc` reads and says which two it does not."""
    guide = (ROOT / "docs" / "standalone.md").read_text()
    paragraph = guide[guide.index("It reads these settings"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]*[A-Z0-9])`", paragraph))
    if "`EXTPROC_TLS_*`" in paragraph:
        named |= {s for s in extproc_cli.SETTINGS if s.startswith("EXTPROC_TLS_")}
    not_its_own = {s.env for s in SETTINGS if s.env.startswith("EXTPROC_")} - set(extproc_cli.SETTINGS)
    assert named == set(extproc_cli.SETTINGS) | not_its_own
    for name in not_its_own:
        assert f"`{name}` is " in paragraph, name


def test_the_standalone_guide_gives_the_envoy_command_for_the_example() -> None:
    guide = (ROOT / "docs" / "standalone.md").read_text()
    assert "envoy/standalone.example.yaml" in guide
    assert re.search(r"^\.venv/bin/envoy -c \S+ ", guide, re.M)
    assert "scripts/make-dev-certs.sh" in guide


# ---------------------------------------------------------------------------------------------------------- metrics


def test_the_token_metric_does_not_call_exact_input_counts_an_estimate() -> None:
    help_text = metrics.TOKENS._documentation
    assert "exact with TOKENIZER_GGUF, else estimated" in help_text, help_text


# ------------------------------------------------------------------------------- the guides name what the code has

METRIC_TOKEN = re.compile(r"`((?:gen_ai|shimmy)_[a-z0-9_]+)")
MIGRATION = "### Metric names before the GenAI conventions"
# Named in the guides, but not metrics: label names, the access log's metadata namespace, a health answer's field,
# the leaf package of Shimmy facts.
NOT_METRICS = {
    "gen_ai_request_model", "gen_ai_token_type", "gen_ai_operation_name", "shimmy_gateway", "shimmy_status",
    "shimmy_spec",
}
# Upper-case names the guides use that are not settings: Shimmy's own variables, Envoy's and Linux's terms, GGUF
# quantizations, KServe's and AI Core's fields, other programs' variables (gRPC, LiteLLM, Anthropic's SDK, pip).
# The image's build arguments are read from the Dockerfile.
NOT_SETTINGS = {
    "SHIMMY_MODEL_PATHS", "SHIMMY_PREFILL_CHUNK", "SHIMMY_HOST", "TCP_USER_TIMEOUT", "FULL_DUPLEX_STREAMED",
    "REFUSED_STREAM", "Q4_K_M", "Q5_K_M", "Q8_0", "STORAGE_URI", "AI_API_URL", "GRPC_POLL_STRATEGY",
    "LITELLM_LOCAL_MODEL_COST_MAP", "ANTHROPIC_BASE_URL", "CMAKE_ARGS", "GGML_NATIVE",
}


def _metric_families() -> dict[str, set[str]]:
    """Each metric's name in the exposition -> the names of its samples (`_total`, `_bucket`, `_sum`, `_count`)."""
    families: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in metrics.REGISTRY.collect():
        own = {family.name + suffix for suffix in suffixes[family.type]}
        families[family.name + ("_total" if family.type == "counter" else "")] = own | {family.name}
    return families


def _prose_without_migration(path: Path) -> str:
    text = path.read_text()
    if MIGRATION in text:  # the old names' table names what no longer exists, on purpose
        head, _, tail = text.partition(MIGRATION)
        text = head + tail[tail.find("\n#") if "\n#" in tail else len(tail):]
    return text


def test_every_metric_the_guides_name_exists_and_every_metric_is_documented() -> None:
    """A renamed or removed metric leaves no guide pointing at it, and a new one is not left out of the guides."""
    families = _metric_families()
    samples = set().union(*families.values())
    named: dict[str, set[str]] = {}
    for guide in GUIDES:
        for token in METRIC_TOKEN.findall(_prose_without_migration(guide)):
            named.setdefault(token, set()).add(guide.name)
    unknown = {t: g for t, g in named.items() if t not in samples | NOT_METRICS and not t.endswith("_")}
    assert not unknown, f"metrics named in the guides that extproc/metrics.py does not have: {unknown}"
    undocumented = {name for name, own in families.items() if not own & named.keys()}
    assert not undocumented, f"metrics no guide names: {undocumented}"


def test_the_migration_table_maps_old_metric_names_onto_existing_ones() -> None:
    section = (ROOT / "docs" / "observability.md").read_text().partition(MIGRATION)[2]
    rows = re.findall(r"^\| `([a-z_]+)[^`]*` \| `([a-z_]+)[^`]*`", section, re.M)
    samples = set().union(*_metric_families().values())
    assert {"gen_ai_usage_tokens_total", "gen_ai_requests_total", "gen_ai_live_streams"} <= {old for old, _ in rows}
    for old, new in rows:
        assert old not in samples and new in samples, (old, new)


def test_every_setting_the_guides_name_exists() -> None:
    """An upper-case name in backticks is a setting of settings/__init__.py (or one of its constants), a build
    argument of the Dockerfile, or one of the few names of other programs listed above."""
    import settings

    known = {s.env for s in SETTINGS} | {n for n in vars(settings) if n.isupper()}
    build_args = set(re.findall(r"^ARG (\w+)", (ROOT / "Dockerfile").read_text(), re.M))
    for guide in GUIDES:
        named = set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)[`=]", FENCE.sub("", guide.read_text())))
        unknown = named - known - build_args - NOT_SETTINGS
        assert not unknown, f"{guide.name} names settings that do not exist: {unknown}"


def _route_for(routes: list[dict], path: str, method: str) -> dict | None:
    """The first route of the rendered Envoy config that `method path` takes (its path and `:method` matchers)."""
    for route in routes:
        match = route["match"]
        if "path" in match:
            hit = path == match["path"]
        elif "prefix" in match:
            hit = path.startswith(match["prefix"])
        elif "safe_regex" in match:
            hit = re.fullmatch(match["safe_regex"]["regex"], path) is not None
        else:
            continue
        methods = [h["string_match"]["exact"] for h in match.get("headers", []) if h["name"] == ":method"]
        if hit and (not methods or method in methods):
            return route
    return None


def test_every_endpoint_of_the_readme_is_routed() -> None:
    """Each path of the README's endpoint table (each of its methods) reaches a route that is not the 404."""
    from gateway.envoy_config import render
    from settings import load

    config = render(load(argv=[], environ={}))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    table = README.read_text().partition("## Endpoints")[2].partition("\n\n")[2].partition("\n\n")[0]
    rows = re.findall(r"^\| (`/[^|]+) \| ([A-Z, ]+) \|", table, re.M)
    assert len(rows) >= 8, table
    for paths, methods in rows:
        for path in re.findall(r"`(/[^`]+)`", paths):
            for method in methods.replace(" ", "").split(","):
                route = _route_for(routes, path.replace("{model}", "phi3-lora"), method)
                assert route is not None, (method, path)
                assert route.get("direct_response", {}).get("status") not in (404, 405), (method, path, route)
