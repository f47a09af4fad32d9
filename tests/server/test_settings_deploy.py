"""Settings read from COTAP_* and from `cotap serve` flags (one flag per setting), and the
deployment files: compose services, Dockerfile and README run the same `cotap serve`."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cotap.cli.main import build_parser
from cotap.cli.serve_cmd import FLAGS, flag_name, settings_from_args
from cotap.server.settings import DEFAULT_MODEL_DIR, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_has_a_flag_and_back() -> None:
    flags = {s for s, _, _ in FLAGS} | {"models"}
    assert flags == set(Settings.model_fields)
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    options = {o for a in serve._actions for o in a.option_strings}
    for setting, _, _ in FLAGS:
        assert flag_name(setting) in options
    assert "--model" in options


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTAP_MAX_BATCH", "7")
    monkeypatch.setenv("COTAP_MODELS", "a=/x/a, /y/b")
    monkeypatch.setenv("COTAP_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("COTAP_API_KEY", "")
    s = Settings()
    assert s.max_batch == 7 and s.api_key is None
    assert s.model_specs() == [("a", Path("/x/a")), (None, Path("/y/b"))]
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    args = build_parser().parse_args(
        ["serve", "--max-batch", "3", "--model", "m=/z", "--no-warmup", "--port", "9001"]
    )
    s2 = settings_from_args(args)
    assert (s2.max_batch, s2.port, s2.warmup, s2.models) == (3, 9001, False, ["m=/z"])
    assert s2.cors_origins == ["https://a.example", "https://b.example"]  # from the environment


def test_bad_settings_are_clear_errors() -> None:
    from cotap.cli.common import CLIError

    with pytest.raises(CLIError, match="--max-batch"):
        settings_from_args(build_parser().parse_args(["serve", "--max-batch", "0"]))
    with pytest.raises(ValueError, match="unique"):
        Settings(models=["a=/x", "a=/y"])
    with pytest.raises(ValueError):
        Settings(backend="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(CLIError, match="--max-json-depth"):  # 3 would refuse every JSON pairs body
        settings_from_args(build_parser().parse_args(["serve", "--max-json-depth", "3"]))
    with pytest.raises(CLIError, match="--body-timeout-s"):
        settings_from_args(build_parser().parse_args(["serve", "--body-timeout-s", "0"]))


def test_names_and_keys_that_http_cannot_carry_are_refused_at_startup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model name goes into the X-Model header and a key into Authorization: both must survive
    HTTP unchanged, or every request fails later (500, or 401 for every client)."""
    from cotap.cli.common import CLIError

    for bad in ("模型", "a b", "-lead", "x" * 129, "a/b"):
        with pytest.raises(ValueError, match="model name"):
            Settings(models=[f"{bad}=/x"])
    Settings(models=["vits16.fp16_v2-b=/x"])  # letters, digits, '.', '_', '-'
    for bad in ("clé-secrète", "two words", "tab\tkey"):
        with pytest.raises(ValueError, match="bearer token"):
            Settings(api_key=bad)
    assert Settings(api_key="s3cr3t-Key_0.9~+/==").api_key is not None
    monkeypatch.setenv("COTAP_API_KEY", "clé")
    with pytest.raises(CLIError, match="COTAP_API_KEY: .*bearer token"):  # names the variable, not a flag
        settings_from_args(build_parser().parse_args(["serve"]))
    with pytest.raises(CLIError, match="--api-key: .*bearer token"):
        settings_from_args(build_parser().parse_args(["serve", "--api-key", "clé"]))
    monkeypatch.delenv("COTAP_API_KEY")
    with pytest.raises(CLIError, match="settings: .*unique"):  # not tied to one setting
        settings_from_args(build_parser().parse_args(["serve", "--model", "a=/x", "--model", "a=/y"]))


def test_a_bundle_whose_name_cannot_be_served_is_refused(tmp_path: Path) -> None:
    from cotap.server.registry import load_model
    from tests.server.helpers import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "b", seed=0, name="my model")
    with pytest.raises(ValueError, match="'my model' is not usable.*NAME=PATH"):
        load_model(None, bundle, Settings(warmup=False))
    assert load_model("mine", bundle, Settings(warmup=False)).name == "mine"  # renamed at serve time


def test_unknown_cotap_variables_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    from cotap.cli.serve_cmd import warn_unknown_env

    env = {"COTAP_MAX_BACH": "8", "COTAP_URL": "http://x", "COTAP_MAX_BATCH": "8", "HOME": "/root"}
    out = warn_unknown_env("COTAP_", set(Settings.model_fields), env)
    assert out == ["warning: ignoring COTAP_MAX_BACH: not a server setting; did you mean COTAP_MAX_BATCH?"]
    assert "COTAP_MAX_BACH" in capsys.readouterr().err


def test_default_is_the_embedded_bundle() -> None:
    assert Settings(models=[]).model_specs() == [(None, DEFAULT_MODEL_DIR)]


def _serve_args(command: list[str]) -> Settings:
    assert command[:2] == ["cotap", "serve"], command
    args = build_parser().parse_args(command[1:])
    assert args.func.__module__ == "cotap.cli.serve_cmd"
    return settings_from_args(args)


def test_compose_services_run_cotap_serve_with_health_checks() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"cotap", "cotap-cpu", "cotap-replica", "nginx"} <= set(services)
    for name in ("cotap", "cotap-cpu", "cotap-replica"):
        svc = services[name]
        _serve_args(svc["command"])
        assert svc["environment"]["COTAP_HOST"] == "0.0.0.0"
        assert "/health/ready" in " ".join(svc["healthcheck"]["test"])
        assert svc["stop_signal"] == "SIGTERM"
    gpu = services["cotap"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "profiles" not in services["cotap"]
    assert (
        services["cotap-cpu"]["profiles"] == ["cpu"]
        and services["cotap-cpu"]["environment"]["COTAP_DEVICE"] == "cpu"
    )
    assert (
        services["cotap-replica"]["profiles"] == ["replicated"]
        and services["cotap-replica"]["deploy"]["replicas"] >= 2
    )
    nginx = services["nginx"]
    assert (
        nginx["profiles"] == ["replicated"]
        and "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    )
    assert nginx["depends_on"]["cotap-replica"]["condition"] == "service_healthy"
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"upstream cotap_replicas \{[^}]*server cotap-replica:8000", conf)
    assert "proxy_pass http://cotap_replicas;" in conf and "http_503" in conf
    assert re.search(r"server cotap-replica:8000[^;]* resolve;", conf) and "resolver 127.0.0.11" in conf
    # nginx's own 413 is the server's envelope (nginx -t and a live 33 MB upload: docs/server.md)
    body = re.search(r"return 413 '(.*)';", conf)
    assert body is not None
    envelope = json.loads(body.group(1).replace("$cotap_request_id", "rid"))
    assert envelope["error"]["code"] == "payload_too_large" and envelope["error"]["request_id"] == "rid"
    for healthcheck in (services["cotap"]["healthcheck"]["test"][-1], (ROOT / "Dockerfile").read_text()):
        assert "os.environ.get('COTAP_PORT', '8000')" in healthcheck  # follows the port setting


def test_dockerfile_and_readme_run_the_same_command() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", docker, re.M)
    assert cmd and "ENTRYPOINT" not in docker
    command = yaml.safe_load(cmd.group(1))
    _serve_args(command)
    assert "COTAP_HOST=0.0.0.0" in docker and "/health/ready" in docker
    assert "pip install -q -c requirements.lock '.[serve,train]'" in docker  # the audited versions
    readme = (ROOT / "README.md").read_text().splitlines()
    first = next(line for line in readme if line.startswith("python3 -m venv"))
    steps = [shlex.split(s) for s in first.split("&&")]
    assert steps[-1] == command  # the README's first command ends with exactly the container's
    assert "'.[serve]'" in first and "torch" not in first  # the default model ships its ONNX model
    assert readme.index(first) < readme.index("<!-- test-command -->")
