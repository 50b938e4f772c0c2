"""The deployment files agree with the daemon, so they cannot drift apart unnoticed.

Every daemon config embedded in a ConfigMap under `k8s/` goes through the real config loader
(with the Secret files it reads laid out in a tmp dir), and the Pod around it is checked
against that config: container ports, probe ports and paths, Services, NetworkPolicy ports,
the Redis address, where the Secrets are mounted, and the shutdown timing (preStop +
drain.grace_period within terminationGracePeriodSeconds). The Dockerfile's CMD and HEALTHCHECK
are checked against the admin listener's defaults, and the HEALTHCHECK command is run. Schema,
lint and policy checks of the same files are in scripts/check-deploy.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, final
from urllib.parse import urlsplit

import pytest
import trio
import yaml

from resilient_ambassador import __version__
from resilient_ambassador.config_loader import load_config_text
from resilient_ambassador.core.config import AdminConfig, Config
from resilient_ambassador.secrets import SecretResolver
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.upstream import Reply, start_fake_upstream

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
# Time left after preStop + drain for the process to exit and the kubelet to notice.
SPARE_S = 5
IMAGE_NAME = "resilient-ambassador"
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
FILE_REF_RE = re.compile(r"\$\{file:(/[^}]*)\}")

Obj = dict[str, Any]


@final
@dataclass(frozen=True)
class Case:
    """One workload running the ambassador, with the manifest file it came from."""

    path: Path
    docs: list[Obj]
    workload: Obj
    ambassador: Obj
    config_text: str

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.workload['kind']}/{self.workload['metadata']['name']}"

    @property
    def namespace(self) -> str | None:
        ns: str | None = self.workload["metadata"].get("namespace")
        return ns

    @property
    def pod(self) -> Obj:
        spec: Obj = self.workload["spec"]["template"]["spec"]
        return spec

    @property
    def is_native_sidecar(self) -> bool:
        return any(c is self.ambassador for c in self.pod.get("initContainers", []))

    def containers(self) -> list[Obj]:
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]

    def others(self) -> list[Obj]:
        return [c for c in self.containers() if c is not self.ambassador]

    def volume(self, name: str) -> Obj:
        matches = [v for v in self.pod.get("volumes", []) if v["name"] == name]
        assert len(matches) == 1, f"{self.id}: volume {name!r} defined {len(matches)} times"
        volume: Obj = matches[0]
        return volume

    def objects(self, kind: str) -> list[Obj]:
        namespace = self.namespace
        return [d for d in self.docs if d["kind"] == kind and d["metadata"].get("namespace") == namespace]


def _load(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _config_of(path: Path, docs: list[Obj], workload: Obj) -> tuple[Obj, str] | None:
    """The container started with `--config FILE` and the ConfigMap entry mounted at FILE."""
    pod = workload["spec"]["template"]["spec"]
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        args = [*container.get("command", []), *container.get("args", [])]
        if "--config" not in args:
            continue
        config_path = PurePosixPath(args[args.index("--config") + 1])
        for mount in container.get("volumeMounts", []):
            if PurePosixPath(mount["mountPath"]) != config_path.parent:
                continue
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            maps = [
                d
                for d in docs
                if d["kind"] == "ConfigMap"
                and d["metadata"]["name"] == volume["configMap"]["name"]
                and d["metadata"].get("namespace") == workload["metadata"].get("namespace")
            ]
            assert len(maps) == 1, f"{path.name}: ConfigMap {volume['configMap']['name']!r} not in the file"
            text: str = maps[0]["data"][config_path.name]
            return container, text
        raise AssertionError(f"{path.name}: --config {config_path} is not on a ConfigMap mount")
    return None


def _cases() -> list[Case]:
    cases = []
    for path in sorted(K8S.glob("*.yaml")):
        docs = _load(path)
        for workload in docs:
            if workload["kind"] not in WORKLOAD_KINDS:
                continue
            found = _config_of(path, docs, workload)
            if found is not None:
                cases.append(Case(path, docs, workload, found[0], found[1]))
    return cases


CASES = _cases()


def _secret_mounts(case: Case) -> list[tuple[Obj, Obj]]:
    """The ambassador's volume mounts backed by a Secret, with their volumes."""
    out = []
    for mount in case.ambassador.get("volumeMounts", []):
        volume = case.volume(mount["name"])
        if "secret" in volume:
            out.append((mount, volume))
    return out


def _load_case(case: Case, tmp_path: Path) -> Config:
    """Load the embedded config as the daemon in that Pod would: each Secret mount is laid out
    under tmp_path (one file per key, or per listed item) and `${file:}` references into it are
    pointed there. A reference outside every Secret mount is left alone and fails to load."""
    text = case.config_text
    for mount, volume in _secret_mounts(case):
        local = tmp_path / mount["name"]
        local.mkdir()
        items = volume["secret"].get("items") or [{"key": "value", "path": "value"}]
        for item in items:
            (local / item["path"]).write_text(f"fake-{item['key']}\n")
        text = text.replace(f"${{file:{mount['mountPath'].rstrip('/')}/", f"${{file:{local}/")
    environ = {
        env["name"]: env.get("value", "fake") for env in case.ambassador.get("env", []) if "name" in env
    }
    return load_config_text(text, f"{case.path.name}:config.yaml", SecretResolver(environ=environ))


def _named_port(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    matches = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert len(matches) == 1, f"container {container['name']}: no single port named {port!r}"
    value: int = matches[0]
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _prestop_s(container: Obj) -> int:
    """Seconds a preStop hook waits: `sleep N` as exec, or the sleep action; 0 without one."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        seconds: int = hook["sleep"]["seconds"]
        return seconds
    command = hook["exec"]["command"]
    assert command[:1] == ["sleep"], f"unrecognised preStop {command}"
    assert len(command) == 2, f"unrecognised preStop {command}"
    return int(command[1])


def test_manifests_have_ambassadors() -> None:
    """Guards the discovery itself: the three examples are found."""
    assert sorted(c.path.name for c in CASES) == [
        "daemonset-redis.yaml",
        "sidecar-jsonplaceholder.yaml",
        "sidecar-tmdb.yaml",
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_embedded_config_loads(case: Case, tmp_path: Path) -> None:
    config = _load_case(case, tmp_path)
    assert config.admin.enabled


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_container_ports_match_listeners(case: Case, tmp_path: Path) -> None:
    """Every port a listener binds beyond loopback, and the admin port, is declared; nothing else."""
    config = _load_case(case, tmp_path)
    declared = {p["containerPort"] for p in case.ambassador.get("ports", [])}
    exposed = {lst.port for lst in config.listeners if not _is_loopback(lst.host)}
    assert declared == exposed | {config.admin.port}
    # The kubelet probes the Pod IP: the admin listener must not be on loopback.
    assert config.admin.host in ("0.0.0.0", "::")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_probes_use_admin_endpoints(case: Case, tmp_path: Path) -> None:
    config = _load_case(case, tmp_path)
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    assert "livenessProbe" in case.ambassador
    assert "readinessProbe" in case.ambassador
    for probe, path in expected.items():
        if probe not in case.ambassador:
            continue
        get = case.ambassador[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _named_port(case.ambassador, get["port"]) == config.admin.port, probe
    if case.is_native_sidecar:
        # The app containers start only once this passes: the ambassador is listening.
        assert "startupProbe" in case.ambassador


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_shutdown_fits_the_grace_period(case: Case, tmp_path: Path) -> None:
    """preStop, then the drain, must end before Kubernetes' SIGKILL."""
    config = _load_case(case, tmp_path)
    grace_s = config.drain.grace_period_s
    tgps = case.pod.get("terminationGracePeriodSeconds", 30)
    if case.is_native_sidecar:
        # A native sidecar is signalled only after every app container has exited.
        assert case.ambassador["restartPolicy"] == "Always"
        assert "preStop" not in case.ambassador.get("lifecycle", {})
        before = max(_prestop_s(c) for c in case.pod["containers"])
    else:
        # Behind a Service: keep accepting while the endpoint is withdrawn (drain stops accepting).
        before = _prestop_s(case.ambassador)
        assert before >= 1, "the ambassador behind a Service needs a preStop wait"
    assert before + grace_s + SPARE_S <= tgps


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_secrets_only_in_the_ambassador(case: Case, tmp_path: Path) -> None:
    """Each `${file:}` lies on a Secret mounted into the ambassador and into no other container."""
    mounts = _secret_mounts(case)
    for ref in FILE_REF_RE.findall(case.config_text):
        owners = [
            (m, v)
            for m, v in mounts
            if PurePosixPath(ref).parent == PurePosixPath(m["mountPath"])
            and PurePosixPath(ref).name in {i["path"] for i in v["secret"].get("items", [])}
        ]
        assert owners, f"{ref} is not a listed item of a Secret mounted into the ambassador"
    secret_volumes = {v["name"] for v in case.pod.get("volumes", []) if "secret" in v or "projected" in v}
    for other in case.others():
        assert not {m["name"] for m in other.get("volumeMounts", [])} & secret_volumes, other["name"]
        assert "envFrom" not in other, other["name"]
        assert all("valueFrom" not in env for env in other.get("env", [])), other["name"]
    assert case.pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_app_containers_call_a_listener(case: Case, tmp_path: Path) -> None:
    """An app's `http://localhost:PORT` in the same Pod is a loopback listener of the config."""
    config = _load_case(case, tmp_path)
    loopback_ports = {lst.port for lst in config.listeners if _is_loopback(lst.host)}
    urls = [env["value"] for c in case.others() for env in c.get("env", []) if "value" in env]
    local = [urlsplit(u) for u in urls if urlsplit(u).hostname == "localhost"]
    if case.is_native_sidecar:
        assert local, "the sidecar example's app should show how it reaches the ambassador"
    for url in local:
        assert url.port in loopback_ports


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_services_reach_data_ports_only(case: Case, tmp_path: Path) -> None:
    config = _load_case(case, tmp_path)
    labels = case.workload["spec"]["template"]["metadata"]["labels"]
    services = [s for s in case.objects("Service") if s["spec"]["selector"].items() <= labels.items()]
    data_ports = {lst.port for lst in config.listeners if not _is_loopback(lst.host)}
    if case.workload["kind"] == "DaemonSet":
        assert services, "a per-node ambassador needs its node-local Service"
    for service in services:
        targets = {_named_port(case.ambassador, p["targetPort"]) for p in service["spec"]["ports"]}
        assert targets <= data_ports
        assert config.admin.port not in targets
        if case.workload["kind"] == "DaemonSet":
            assert service["spec"]["internalTrafficPolicy"] == "Local"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_redis_is_in_the_manifest(case: Case, tmp_path: Path) -> None:
    """`redis.url` names a Service of the same file and namespace, on a port it exposes."""
    config = _load_case(case, tmp_path)
    if config.redis.url is None:
        assert all(u.breaker.shared == "none" for u in config.upstreams.values())
        return
    url = urlsplit(config.redis.url)
    assert url.hostname is not None
    name = url.hostname.split(".")[0]
    services = [s for s in case.objects("Service") if s["metadata"]["name"] == name]
    assert len(services) == 1, f"no Service {name!r} for redis.url"
    assert (url.port or 6379) in {p["port"] for p in services[0]["spec"]["ports"]}
    assert any(u.breaker.shared == "redis" for u in config.upstreams.values())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_network_policies_match_ports(case: Case, tmp_path: Path) -> None:
    """A NetworkPolicy on the ambassador's Pods admits only data ports (never the admin port),
    and lets it reach the Redis it is configured with."""
    config = _load_case(case, tmp_path)
    labels = case.workload["spec"]["template"]["metadata"]["labels"]
    policies = [
        p
        for p in case.objects("NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert policies, "every example isolates its Pods"
    data_ports = {lst.port for lst in config.listeners if not _is_loopback(lst.host)}
    for policy in policies:
        ingress_ports = {port["port"] for rule in policy["spec"].get("ingress", []) for port in rule["ports"]}
        assert ingress_ports <= data_ports
        if config.redis.url is not None:
            egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
            assert (urlsplit(config.redis.url).port or 6379) in egress_ports


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_restricted_pod_security(case: Case) -> None:
    pod = case.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in case.containers():
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]
        assert {"requests", "limits"} <= container["resources"].keys(), container["name"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_image_is_this_version(case: Case) -> None:
    name, _, tag = case.ambassador["image"].rpartition(":")
    assert name.rsplit("/", 1)[-1] == IMAGE_NAME
    assert tag == __version__


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    out = []
    for line in lines:
        instruction, _, rest = line.strip().partition(" ")
        out.append((instruction.upper(), rest.strip()))
    return out


def _exec_form(instruction: str) -> list[str]:
    values = [arg for name, arg in _dockerfile_instructions() if name == instruction]
    assert len(values) == 1, f"expected one {instruction}"
    form = yaml.safe_load(values[0])  # a JSON array is YAML too
    assert isinstance(form, list), f"{instruction} must be in exec form so SIGTERM reaches the daemon"
    return [str(v) for v in form]


def test_dockerfile_runs_the_daemon_with_admin_reachable() -> None:
    assert _exec_form("ENTRYPOINT") == [IMAGE_NAME]
    cmd = _exec_form("CMD")
    assert cmd[0] == "run"
    host, _, port = cmd[cmd.index("--admin") + 1].rpartition(":")
    assert host == "0.0.0.0"
    assert int(port) == AdminConfig().port
    exposed = {int(p) for name, arg in _dockerfile_instructions() if name == "EXPOSE" for p in arg.split()}
    assert AdminConfig().port in exposed


def _healthcheck() -> list[str]:
    (healthcheck,) = [arg for name, arg in _dockerfile_instructions() if name == "HEALTHCHECK"]
    command = yaml.safe_load(healthcheck[healthcheck.index("CMD ") + len("CMD ") :])
    assert isinstance(command, list), "HEALTHCHECK CMD in exec form: the image may have no shell"
    return [str(part) for part in command]


def test_dockerfile_healthcheck_targets_admin_healthz() -> None:
    probe = " ".join(_healthcheck())
    assert f"'127.0.0.1', {AdminConfig().port}," in probe
    assert "'/healthz'" in probe


async def _run_healthcheck(port: int) -> int:
    """The HEALTHCHECK command as the image runs it, aimed at `port` instead of 9901."""
    command = _healthcheck()
    assert command[:2] == ["python", "-c"]
    code = command[2].replace(f"'127.0.0.1', {AdminConfig().port},", f"'127.0.0.1', {port},")
    result = await trio.run_process([sys.executable, "-c", code], check=False, capture_stderr=True)
    return result.returncode


async def test_dockerfile_healthcheck_passes_on_healthz_only(nursery: trio.Nursery) -> None:
    """Run for real: 0 against a live admin listener; non-zero on a refused connection and on
    a non-200 answer."""
    upstream = await start_fake_upstream(nursery, default=Reply(status=503))
    daemon = await start_daemon(nursery, simple_config(upstream_config(upstream.url())))
    assert await _run_healthcheck(daemon.admin_port) == 0
    unhealthy = urlsplit(upstream.url()).port
    assert unhealthy is not None
    assert await _run_healthcheck(unhealthy) != 0
    with socket.socket() as closed:  # bound, never listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        assert await _run_healthcheck(closed.getsockname()[1]) != 0


def test_dockerfile_user_is_numeric_non_root() -> None:
    (user,) = [arg for name, arg in _dockerfile_instructions() if name == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) > 0
    assert not gid or gid.isdigit()
