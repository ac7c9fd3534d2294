"""The cluster launcher configs under Ray's own schema check, what a cluster opens and to whom, and a
real two-node sweep on this machine.

What cannot run here (cloud provisioning, S3 and GCS, GPU workers, the MLflow server on the head) is
listed in docs/cluster.md, with the commands that check it on a real cluster. The one-time cloud setup
that keeps a cluster closed (security group, firewall, the workers' IAM) is commands on that page, so
the tests below read them there.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from unittest import mock

import jsonschema
import pytest
import yaml
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import write_cifar_folders

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("cluster*.yaml"))
CLOUD = {"aws": "s3://", "gcp": "gs://"}  # provider type -> the object store its storage path is on
TOKEN = "~/.ray/auth_token"  # Ray's default token path, on your machine and on every node
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)

# GPUs and vCPUs of the instance types the configs may use, from the providers' documentation
# (AWS: g5.xlarge 1x A10G, g5.48xlarge 8x A10G; GCP: g2-standard-8 1x L4, g2-standard-96 8x L4).
# The check that the "8-GPU type" really has 8 GPUs rests on this table; add a row to use another type.
INSTANCE_TYPES = {
    "m5.xlarge": (0, 4),
    "g5.xlarge": (1, 4),
    "g5.48xlarge": (8, 192),
    "n2-standard-4": (0, 4),
    "g2-standard-8": (1, 8),
    "g2-standard-96": (8, 96),
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def check(config: dict) -> None:
    """Ray's own offline check, as `ray up` runs it: defaults merged in, then the JSON schema."""
    validate_config(prepare_config(copy.deepcopy(config)))


def provider(config: dict) -> str:
    return config["provider"]["type"]


def hardware(node_type: dict) -> tuple[int, int]:
    """(GPUs, vCPUs) of a node type's instance type."""
    node_config = node_type["node_config"]
    name = node_config.get("InstanceType") or node_config["machineType"]
    assert name in INSTANCE_TYPES, f"{name}: add its GPUs and vCPUs to INSTANCE_TYPES"
    return INSTANCE_TYPES[name]


def commands(config: dict, *keys: str) -> str:
    return "\n".join(cmd for key in keys for cmd in config.get(key, []))


def pins(text: str) -> dict[str, str]:
    """`name==version` pins in shell commands, e.g. torch==2.14.1 or "ray[default,tune]==2.60.0"."""
    return {m[1].lower(): m[2] for m in re.finditer(r"\b([A-Za-z][\w-]*)(?:\[[^\]]*\])?==([\w.+-]+)", text)}


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(params=CONFIGS, ids=lambda p: p.name)
def config_path(request, monkeypatch) -> Path:
    monkeypatch.chdir(ROOT)  # file_mounts' local paths are relative to the repo root, where `ray up` runs
    return request.param


# --- offline validation ---------------------------------------------------------------------------


def test_cluster_yaml_is_the_aws_config():
    names = {p.name for p in CONFIGS}
    assert "cluster.yaml" in names
    assert provider(load(ROOT / "cluster.yaml")) == "aws"


def test_config_passes_rays_schema_check(config_path):
    check(load(config_path))


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: c.__setitem__("idle_timout_minutes", c.pop("idle_timeout_minutes")), id="top-level"),
        pytest.param(lambda c: c["auth"].__setitem__("ssh_usr", c["auth"].pop("ssh_user")), id="auth"),
        pytest.param(lambda c: c.__setitem__("setup_command", c.pop("setup_commands")), id="commands"),
    ],
)
def test_a_mistyped_key_is_rejected(config_path, break_it):
    config = load(config_path)
    break_it(config)
    with pytest.raises(jsonschema.ValidationError, match="was unexpected"):
        check(config)


# The on-prem file (provider `local`) lists machines by IP: it has no node types to mistype.
WITH_NODE_TYPES = [p for p in CONFIGS if "available_node_types" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("config_path", WITH_NODE_TYPES, ids=lambda p: p.name, indirect=True)
def test_node_type_mistakes_are_rejected(config_path):
    config = load(config_path)
    worker = next(name for name in config["available_node_types"] if name != config["head_node_type"])

    mistyped = copy.deepcopy(config)
    node = mistyped["available_node_types"][worker]
    node["min_worker"] = node.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        check(mistyped)

    # Cluster resources are whole units; fractional GPUs belong to trials (--gpus-per-trial).
    fractional = copy.deepcopy(config)
    fractional["available_node_types"][worker]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        check(fractional)


def test_gpu_workers_scale_from_zero_and_the_head_has_no_gpu(config_path):
    config = load(config_path)
    if provider(config) == "local":
        # A fixed set of machines: nothing scales; the head's Ray start keeps trials and GPUs off it.
        head_start = commands(config, "head_start_ray_commands")
        assert "--num-gpus=0" in head_start and "--num-cpus=0" in head_start
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
        return

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert hardware(head)[0] == 0, "the head's instance type has GPUs"
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "trials would run on the head"

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpus = []
    for name, worker in workers.items():
        n_gpus, n_cpus = hardware(worker)
        assert worker["resources"] == {"CPU": n_cpus, "GPU": n_gpus}, f"{name}: resources differ from the hardware"
        assert worker["min_workers"] == 0, f"{name}: an idle cluster would keep paying for it"
        assert 1 <= worker["max_workers"] <= config["max_workers"], name
        gpus.append(n_gpus)
    assert sorted(gpus) == [1, 8], "expected a 1-GPU and an 8-GPU worker type"

    assert 0 < config.get("idle_timeout_minutes", 0) <= 10, "set idle_timeout_minutes, so idle workers go away"
    if provider(config) == "aws":
        stopped = config["provider"].get("cache_stopped_nodes", True)  # Ray's default: stop, not terminate
        assert stopped is False, "a stopped instance still bills its EBS volume: terminate idle workers"


def test_every_node_installs_this_project_with_the_pinned_versions(config_path):
    config = load(config_path)
    setup = commands(config, "setup_commands")  # run on the head and on every worker
    assert not config.get("worker_setup_commands"), "workers would differ from the head"
    pinned = pins(setup)

    # torch and torchvision exactly as .ci/run (and the README's set-up) install them, and within pyproject's ranges.
    ci_pins = pins((ROOT / ".ci" / "run").read_text())
    deps = {Requirement(d).name: Requirement(d) for d in pyproject()["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        assert pinned[name] == ci_pins[name], name
        assert deps[name].specifier.contains(pinned[name]), f"pyproject.toml does not admit {name}=={pinned[name]}"
    # Ray within pyproject's range, and the one docs/cluster.md installs for `ray up`: launcher and cluster agree.
    assert deps["ray"].specifier.contains(pinned["ray"])
    launcher = re.search(r"pip install [^\n]*\"ray\[default\]==([\w.]+)\"", (ROOT / "docs" / "cluster.md").read_text())
    assert launcher and launcher[1] == pinned["ray"], "README's launcher Ray differs from the cluster's"

    # The project is synced to one folder on every node and installed from there, after torch. The token
    # is the one mount from outside the checkout (test_token_authentication_is_on_for_every_node).
    mounts = {remote: local for remote, local in config["file_mounts"].items() if remote != TOKEN}
    roots = {str(Path(remote).parent) for remote in mounts}
    assert len(roots) == 1, roots
    (root,) = roots
    synced = {Path(remote).name for remote in mounts}
    packages = {p.split(".")[0] for p in pyproject()["tool"]["setuptools"]["packages"]}  # their top folders
    assert packages | {"pyproject.toml", pyproject()["project"]["readme"]} <= synced
    for local in mounts.values():
        assert (ROOT / local).exists(), local
    install = re.search(rf"pip install .*-e {re.escape(root)}(\s|$)", setup)
    assert install, f"no `pip install -e {root}` in setup_commands"
    assert setup.index("torch==") < install.start(), "install torch before the project, so pip keeps the pin"


def test_mlflow_server_runs_on_the_head_only(config_path):
    config = load(config_path)
    head = commands(config, "head_setup_commands", "head_start_ray_commands")
    workers = commands(config, "setup_commands", "worker_setup_commands", "worker_start_ray_commands")
    assert head.count("mlflow server") == 1 and "mlflow server" not in workers
    server = head[head.index("mlflow server") :]
    # Backend store on the head's own disk; only the driver (on the head) writes, so localhost only.
    assert re.search(r"--backend-store-uri sqlite:///\$HOME/", server)
    assert "--host 127.0.0.1" in server
    artifacts = re.search(r"--artifacts-destination (\S+?)'?(\s|$)", server)[1]
    kind = provider(config)
    assert artifacts.startswith(CLOUD.get(kind, "/mnt/nfs/")), f"{kind}: artifacts at {artifacts}"


def test_every_node_gets_the_same_shared_storage_path(config_path):
    config = load(config_path)
    setup = commands(config, "setup_commands")
    (storage,) = re.findall(r"echo 'export CNNCLF_STORAGE_PATH=([^']+)'", setup)
    kind = provider(config)
    assert storage.startswith(CLOUD.get(kind, "/mnt/nfs/")), f"{kind}: Tune's storage path {storage} is not shared"
    if kind in CLOUD:
        # Trials upload their own checkpoints, so every GPU worker needs write access to the bucket.
        bucket = storage.split("/")[2]
        artifacts = re.search(r"--artifacts-destination (\S+?)'?(\s|$)", commands(config, "head_start_ray_commands"))
        assert artifacts[1].split("/")[2] == bucket, "MLflow's artifacts and Tune's storage in different buckets"
        for name, node in config["available_node_types"].items():
            if name != config["head_node_type"]:
                node_config = node["node_config"]
                assert "IamInstanceProfile" in node_config or "serviceAccounts" in node_config, name


# --- what a cluster opens, and to whom ------------------------------------------------------------

AWS = ROOT / "cluster.yaml"
GCP = ROOT / "cluster-gcp.yaml"
CLOUD_CONFIGS = [p for p in CONFIGS if provider(load(p)) in CLOUD]


# Ray's cloud provider modules import their cloud's SDK, which this project does not depend on. The
# bootstrap steps under test make no cloud call (or take their client as an argument), so stand-ins do.
CLOUD_SDKS = {
    "aws": "boto3 boto3.exceptions boto3.resources boto3.resources.base botocore botocore.client botocore.config",
    "gcp": "google_auth_httplib2 googleapiclient googleapiclient.discovery googleapiclient.errors httplib2 "
    "google.oauth2 google.oauth2.service_account google.oauth2.credentials",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@contextlib.contextmanager
def ray_cloud_config(kind: str) -> Iterator[ModuleType]:
    """Ray's `aws` or `gcp` config module (the `ray up` bootstrap steps), imported with stand-ins for a
    missing SDK. Afterwards the stand-ins and the modules bound to them leave sys.modules again; other
    modules imported meanwhile stay, so that no later import makes a second copy of them."""
    package = f"ray.autoscaler._private.{kind}"
    # __version__: Ray checks boto3's against a minimum.
    stubs = {name: mock.MagicMock(__version__="999") for name in CLOUD_SDKS[kind].split() if not _installed(name)}
    before = set(sys.modules)
    sys.modules.update(stubs)
    try:
        yield importlib.import_module(f"{package}.config")
    finally:
        if stubs:
            for name in set(sys.modules) - before:
                if name in stubs or name == package or name.startswith(f"{package}."):
                    del sys.modules[name]


def worker_configs(config: dict) -> list[dict]:
    types = config["available_node_types"]
    return [t["node_config"] for name, t in types.items() if name != config["head_node_type"]]


def readme_cluster() -> str:
    """docs/cluster.md: the one-time setup commands that keep a cloud cluster closed live there."""
    return (ROOT / "docs" / "cluster.md").read_text()


def readme_commands(text: str) -> list[list[str]]:
    """The shell commands of the indented code blocks, continuation lines joined, each as argv."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # fenced blocks hold data (the IAM policy), not commands
    commands, pending = [], ""
    for line in text.splitlines():
        if not re.match(r" {4,}\S", line):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        commands.append(shlex.split(pending, comments=True))
        pending = ""
    return commands


def flags(argv: list[str]) -> dict[str, str]:
    """`--name value` pairs of one command line ("" for a flag without a value)."""
    return {
        arg: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        for i, arg in enumerate(argv)
        if arg.startswith("--")
    }


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_dashboard_and_job_api_listen_on_loopback_only(config_path):
    # The job API runs whatever it is sent; `ray dashboard <file>` reaches it through an SSH tunnel.
    config = load(config_path)
    (head_start,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start --head" in cmd]
    assert re.findall(r"--dashboard-host[= ](\S+)", head_start) == ["127.0.0.1"]
    assert "0.0.0.0" not in commands(config, *COMMAND_KEYS), "something listens on every interface"


def test_token_authentication_is_on_for_every_node(config_path, tmp_path):
    from ray.autoscaler._private.command_runner import _with_interactive

    config = load(config_path)
    # Ray's recipe for `ray up`: your token mounted on every node, RAY_AUTH_MODE=token in every shell there.
    assert config["file_mounts"].get(TOKEN) == TOKEN, "the token is not mounted on the nodes"
    everything = commands(config, *COMMAND_KEYS)
    assert not re.search(r"RAY_AUTH_MODE=(?!token\b)|RAY_AUTH_TOKEN", everything), "a command overrides the token"
    token_setup = [cmd for cmd in config["setup_commands"] if "RAY_AUTH_MODE" in cmd or "auth_token" in cmd]
    assert token_setup, "no setup command (run on every node, before Ray starts) turns token mode on"

    # Those commands, run twice (a second `ray up`) in a scratch home where the token was just mounted,
    # then a command wrapped as Ray wraps `ray start` and the sweep driver: it must run in token mode.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("not-a-real-token")
    token.chmod(0o644)  # as rsync copies a token that `ray get-auth-token --generate` wrote under umask 022
    (home / ".bashrc").write_text("")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}

    def run_as_ray(cmd: str) -> str:
        r = subprocess.run(" ".join(_with_interactive(cmd)), shell=True, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        return r.stdout

    for cmd in token_setup * 2:
        run_as_ray(cmd)
    assert "mode=token" in run_as_ray("echo mode=$RAY_AUTH_MODE").splitlines()
    assert (home / ".bashrc").read_text().count("RAY_AUTH_MODE") == 1, "each `ray up` adds another line"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600, "the token is readable by other users of the node"


def test_aws_nodes_are_only_in_your_security_group(monkeypatch):
    config = load(AWS)
    # One group of yours on every node type: SSH from your CIDR and traffic between members (docs/cluster.md).
    groups = {tuple(t["node_config"].get("SecurityGroupIds", [])) for t in config["available_node_types"].values()}
    assert len(groups) == 1 and len(next(iter(groups))) == 1, f"every node type needs the same one group: {groups}"
    assert "security_group" not in config["provider"], "its rules would only apply to a group Ray makes"

    # Ray's own bootstrap step, as `ray up` runs it, must leave the groups alone: a group Ray makes
    # always admits SSH from 0.0.0.0/0 (ray/autoscaler/_private/aws/config.py, _create_default_ssh_inbound_rules).
    def refuse(config, node_types):
        raise AssertionError(f"Ray would make its own security group, SSH open to 0.0.0.0/0, for {node_types}")

    with ray_cloud_config("aws") as aws_config:
        monkeypatch.setattr(aws_config, "_upsert_security_groups", refuse)
        aws_config._configure_security_group(prepare_config(copy.deepcopy(config)))


def test_readme_security_group_admits_ssh_from_your_cidr_only():
    text = readme_cluster()
    # Who may connect is said in one place, and it is not the whole internet.
    cidrs = re.findall(r"^\s*MY_CIDR=(\S+)", text, re.M)
    assert len(cidrs) == 1, f"MY_CIDR set {len(cidrs)} times"
    assert ipaddress.ip_network(cidrs[0]).prefixlen > 0

    argvs = readme_commands(text)
    assert any(argv[0].startswith("SG=$(") and "create-security-group" in argv for argv in argvs)
    rules = []
    for argv in argvs:
        if argv[:3] == ["aws", "ec2", "authorize-security-group-ingress"]:
            f = flags(argv)
            # Only the simple form, so that no rule hides in --ip-permissions.
            assert set(f) <= {"--region", "--group-id", "--protocol", "--port", "--cidr", "--source-group"}, argv
            rules.append(
                (f["--group-id"], f["--protocol"], f.get("--port"), f.get("--cidr") or f.get("--source-group"))
            )
    expected = [("$SG", "all", None, "$SG"), ("$SG", "tcp", "22", "$MY_CIDR")]
    assert sorted(rules, key=str) == expected, "the group must admit SSH from MY_CIDR and its own members, nothing else"

    # It is the group that cluster.yaml puts every node in.
    (group,) = {g for t in load(AWS)["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]}
    assert ["sed", "-i", f"s/{group}/$SG/g", "cluster.yaml"] in argvs


@pytest.mark.parametrize("config_path", CLOUD_CONFIGS, ids=lambda p: p.name, indirect=True)
def test_workers_hold_an_identity_for_the_bucket_only(config_path):
    # Ray's default identities (the head's) can start instances and read every bucket; code in any
    # trial could use them. Workers get one of their own, whose grants docs/cluster.md makes.
    config = load(config_path)
    kind = provider(config)
    with ray_cloud_config(kind) as ray_config:
        default = ray_config.DEFAULT_RAY_INSTANCE_PROFILE if kind == "aws" else ray_config.DEFAULT_SERVICE_ACCOUNT_ID
    workers = worker_configs(config)
    if kind == "aws":
        (profile,) = {json.dumps(w["IamInstanceProfile"], sort_keys=True) for w in workers}
        assert default not in profile, profile
        return
    (accounts,) = {json.dumps(w["serviceAccounts"], sort_keys=True) for w in workers}
    (account,) = json.loads(accounts)
    assert not account["email"].startswith(f"{default}@"), account["email"]
    # Storage only, on top of the account's IAM: cloud-platform would leave IAM as the only limit.
    assert account["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"]


def test_readme_grants_the_workers_the_bucket_only():
    text = readme_cluster()
    argvs = readme_commands(text)
    aws = load(AWS)
    bucket, prefix = re.search(r"CNNCLF_STORAGE_PATH=s3://([^/]+)/([^']+)", commands(aws, "setup_commands")).groups()

    # AWS: the policy names nothing but S3 actions on the bucket, and enough for Tune's checkpoints.
    policies = [p for p in map(json.loads, re.findall(r"```json\n(.*?)```", text, re.S)) if "Statement" in p]
    assert len(policies) == 1, f"expected the workers' IAM policy as one ```json block, found {len(policies)}"
    (policy,) = policies
    for statement in policy["Statement"]:
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource"} and statement["Effect"] == "Allow", statement
        assert all(a.startswith("s3:") and "*" not in a for a in as_list(statement["Action"])), statement
        for resource in as_list(statement["Resource"]):
            assert resource == f"arn:aws:s3:::{bucket}" or resource.startswith(f"arn:aws:s3:::{bucket}/"), resource
    checkpoint = f"arn:aws:s3:::{bucket}/{prefix}/sweep/trial_0/checkpoint_000001/model.pt"
    for action in ("s3:PutObject", "s3:GetObject"):
        assert any(
            action in as_list(s["Action"]) and any(fnmatch(checkpoint, r) for r in as_list(s["Resource"]))
            for s in policy["Statement"]
        ), f"trials could not {action} their checkpoints"

    # The profile that cluster.yaml names holds that policy's role, and the head may pass that role only.
    (profile,) = {w["IamInstanceProfile"]["Name"] for w in worker_configs(aws)}
    (role,) = [flags(a)["--role-name"] for a in argvs if a[:3] == ["aws", "iam", "add-role-to-instance-profile"]]
    assert ["aws", "iam", "create-instance-profile", "--instance-profile-name", profile] in argvs
    put = [flags(a) for a in argvs if a[:3] == ["aws", "iam", "put-role-policy"]]
    assert [f["--policy-document"] for f in put if f["--role-name"] == role] == ["file://worker-policy.json"]
    assert not any(a[:3] == ["aws", "iam", "attach-role-policy"] for a in argvs), "a managed policy grants more"
    (passing,) = [json.loads(f["--policy-document"]) for f in put if f["--role-name"] != role]
    for statement in passing["Statement"]:
        assert statement["Action"] == "iam:PassRole", statement
        assert all(r.endswith(f":role/{role}") for r in as_list(statement["Resource"])), statement

    # GCP: the workers' account is bound on the bucket, never on the project.
    (email,) = {w["serviceAccounts"][0]["email"] for w in worker_configs(load(GCP))}
    bindings = [a for a in argvs if "add-iam-policy-binding" in a and f"serviceAccount:{email}" in a]
    assert bindings, f"nothing grants {email} the bucket"
    for argv in bindings:
        assert argv[:4] == ["gcloud", "storage", "buckets", "add-iam-policy-binding"], argv
        assert argv[4].startswith("gs://") and flags(argv)["--role"] == "roles/storage.objectAdmin", argv


def test_gcp_nodes_are_tagged_and_only_the_head_has_an_external_ip():
    config = load(GCP)
    region = config["provider"]["region"]
    # Ray's own bootstrap step, as `ray up` runs it: a node type without networkInterfaces gets the
    # first subnet Ray lists, with an external IP.
    compute = mock.MagicMock()
    subnet = {"selfLink": f"projects/p/regions/{region}/subnetworks/default"}
    compute.subnetworks.return_value.list.return_value.execute.return_value = {"items": [subnet]}
    with ray_cloud_config("gcp") as gcp_config:
        configured = gcp_config._configure_subnet(prepare_config(copy.deepcopy(config)), compute)

    tags = set()
    for name, node_type in configured["available_node_types"].items():
        node_config = node_type["node_config"]
        tags.add(tuple(node_config.get("tags", {}).get("items", [])))
        (interface,) = node_config["networkInterfaces"]
        assert re.fullmatch(rf"(projects/[^/]+/)?regions/{region}/subnetworks/[\w-]+", interface["subnetwork"])
        external = [c for c in interface.get("accessConfigs", []) if c.get("type") == "ONE_TO_ONE_NAT"]
        if name == config["head_node_type"]:
            assert len(external) == 1, "`ray up` reaches the head by its external IP"
        else:
            assert not interface.get("accessConfigs"), f"{name}: a worker with an external IP"
    assert len(tags) == 1 and len(next(iter(tags))) == 1, f"the firewall rules need one tag on every node: {tags}"


# All a cluster rule may say: nothing that the test below does not read (--source-service-accounts, ...).
FIREWALL_FLAGS = {
    "--network",
    "--direction",
    "--priority",
    "--action",
    "--rules",
    "--source-ranges",
    "--source-tags",
    "--target-tags",
}


def test_readme_gcp_firewall_admits_ssh_from_your_cidr_only():
    node_configs = [t["node_config"] for t in load(GCP)["available_node_types"].values()]
    ((tag,),) = {tuple(c["tags"]["items"]) for c in node_configs}
    # An auto-mode network's subnets are named after it.
    (network,) = {c["networkInterfaces"][0]["subnetwork"].rsplit("/", 1)[1] for c in node_configs}
    argvs = readme_commands(readme_cluster())
    rules = {a[4]: flags(a) for a in argvs if a[:4] == ["gcloud", "compute", "firewall-rules", "create"]}
    assert rules, "no firewall rules for the cluster's tag"
    for name, f in rules.items():
        assert (f["--network"], f["--direction"], f["--target-tags"]) == (network, "INGRESS", tag), name
        assert set(f) <= FIREWALL_FLAGS, name

    allows = [f for f in rules.values() if f["--action"] == "ALLOW"]
    from_outside = [(f["--rules"], f["--source-ranges"]) for f in allows if "--source-ranges" in f]
    assert from_outside == [("tcp:22", "$MY_CIDR")], "only SSH, from MY_CIDR, may come from outside the tag"
    assert all(f["--source-tags"] == tag for f in allows if "--source-ranges" not in f)
    # The default network allows SSH and RDP from anywhere, and everything within it, at priority 65534;
    # a deny for the tag between those and the rules above (lower numbers win) closes that.
    (deny,) = [f for f in rules.values() if f["--action"] == "DENY"]
    assert (deny["--rules"], deny["--source-ranges"]) == ("all", "0.0.0.0/0")
    assert max(int(f["--priority"]) for f in allows) < int(deny["--priority"]) < 65534


# --- a real multi-node run on one machine ---------------------------------------------------------


@dataclass
class Cluster:
    address: str  # the GCS, as `--address` takes it
    node_ids: set[str]
    env: dict[str, str]


class _Ports:
    """Distinct ports for both nodes, taken from one block of consecutive free ports. The block lies
    below the OS's ephemeral range (32768 and up), where nothing picks ports at random, and above
    Ray's default worker ports (10002-19999), which other Ray instances on this machine use."""

    def __init__(self, n: int = 240) -> None:
        for _ in range(200):
            low = random.randrange(20000, 32700 - n)
            try:
                for port in range(low, low + n):
                    with socket.socket() as s:
                        s.bind(("", port))
            except OSError:
                continue
            self._next, self._end = low, low + n
            return
        raise RuntimeError("no free port block")

    def take(self, n: int = 1) -> int:
        first, self._next = self._next, self._next + n
        assert self._next <= self._end, "port block exhausted"
        return first


def _node_ports(ports: _Ports) -> list[str]:
    """Every port a node opens, chosen here: two nodes share this machine (and other Ray instances may too)."""
    low = ports.take(100)
    args = ["--min-worker-port", str(low), "--max-worker-port", str(low + 99)]
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
    ):
        args += [flag, str(ports.take())]
    return args


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --block`: the process stays ours, and SIGTERM to it stops the node's processes."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    proc = subprocess.Popen(
        [ray_cli, "start", "--block", "--num-cpus", "1", "--num-gpus", "0", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # no terminal signal from pytest reaches it; we stop it ourselves
    )
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def _alive_node_ids(address: str) -> set[str]:
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = GcsClient(address=address).get_all_node_info(timeout=30).values()
    return {info.node_id.hex() for info in infos if info.state == GcsNodeInfo.ALIVE}


def _stop(procs: list[subprocess.Popen], temp_dir: Path) -> None:
    for proc in reversed(procs):  # the worker node before the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
    # Anything still naming our private temp dir was started by these nodes: stop it by its pid.
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture
def two_nodes() -> Iterator[Cluster]:
    """A Ray head and a second Ray node, 1 CPU each, as separate processes on this machine."""
    # Its own short temp dir (Unix socket paths must stay under 108 bytes), so nothing here touches
    # /tmp/ray or the address that a plain ray.init() elsewhere on this machine would connect to.
    temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp" if Path("/tmp").is_dir() else None))
    # Token auth off for these private nodes: a token in ~/.ray would otherwise enable it on the head only.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    common = ["--temp-dir", str(temp_dir), "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    ports = _Ports()
    port = ports.take()
    procs: list[subprocess.Popen] = []
    try:
        head_args = ["--head", "--port", str(port), "--include-dashboard", "false"]
        head_args += ["--dashboard-port", str(ports.take()), *common, *_node_ports(ports)]
        procs.append(_start_node(head_args, temp_dir / "head.log", env))
        address = f"127.0.0.1:{port}"
        procs.append(_start_node(["--address", address, *common, *_node_ports(ports)], temp_dir / "node2.log", env))
        deadline = time.monotonic() + 60
        while len(node_ids := _alive_node_ids(address)) < 2:
            assert time.monotonic() < deadline, f"only {len(node_ids)} node(s) joined"
            time.sleep(1)
        yield Cluster(address=address, node_ids=node_ids, env=env)
    finally:
        _stop(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cifar"
    write_cifar_folders(root, 16, 4)
    return root


@pytest.mark.slow
def test_smoke_sweep_spreads_over_two_nodes(two_nodes, cifar_dir, tmp_path):
    name = "two-nodes"
    run = tmp_path / "run"
    run.mkdir()
    storage = run / "ray_results"  # one folder both nodes see, as S3 or NFS is on a real cluster
    tracking = f"sqlite:///{run / 'mlflow.db'}"
    cmd = [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--smoke-test", "--address", two_nodes.address]
    cmd += ["--data-dir", str(cifar_dir), "--tracking-uri", tracking, "--storage-path", str(storage)]
    cmd += ["--name", name, "--out", str(run / "out"), "--no-download"]
    # One CPU per trial and per node, two at once: the second trial can only run on the other node.
    cmd += ["--max-concurrent", "2", "--cpus-per-trial", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=run, env=two_nodes.env)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"

    # Tune's results, written by the trials into the shared storage path: 2 trials + the baseline,
    # then 1 confirmation run; every result names the node that produced it.
    trial_dirs = [d for d in sorted(storage.glob(f"{name}*/*")) if d.is_dir()]
    assert len(trial_dirs) == 4, trial_dirs
    nodes_in_results = set()
    for d in trial_dirs:
        results = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        assert results, d
        assert all(res["node_id"] in two_nodes.node_ids for res in results), d
        nodes_in_results |= {res["node_id"] for res in results}
        last = results[-1]
        assert last["epoch"] == 1 and "val/acc" in last and "test/acc" in last, d
        assert any(d.glob("checkpoint_*")), f"{d}: no checkpoint in the shared storage"
    print(f"trials ran on nodes {sorted(nodes_in_results)}")
    assert nodes_in_results == two_nodes.node_ids, "the trials did not run on both nodes"

    # MLflow, written by the driver only: the sweep's parent run and one finished child run per trial.
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("cifar10")
    found = client.search_runs([experiment.experiment_id], f"tags.sweep = '{name}'", max_results=100)
    parents = [x for x in found if x.data.tags["role"] == "sweep"]
    children = [x for x in found if x.data.tags["role"] != "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(x.data.tags["role"] for x in children) == ["baseline", "confirm", "trial", "trial"]
    assert {x.info.status for x in found} == {"FINISHED"}, "a run was left RUNNING or failed"
    for child in children:
        assert {"val/acc", "test/acc", "time/epoch_s"} <= set(child.data.metrics), child.data.tags["trial_id"]
        assert child.data.tags["node_id"] in two_nodes.node_ids
    assert {x.data.tags["node_id"] for x in children} == two_nodes.node_ids
    assert (run / "out" / name / "best_config.json").is_file()
