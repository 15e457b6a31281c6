"""Settings come from FLEET_* environment variables with documented defaults."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.settings import GatewaySettings, ProducerSettings, WorkerSettings


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = ProducerSettings()
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.backend_url == s.redis_url
    assert s.queue == "fleet"
    assert s.model_routes == {}
    assert s.allowed_models == ()


def test_env_and_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://h:1/2")
    monkeypatch.setenv("FLEET_RESULT_BACKEND_URL", "redis://h:1/3")
    monkeypatch.setenv("FLEET_MODEL_ROUTES", "flux=fleet.big, sdxl = fleet.xl")
    monkeypatch.setenv("FLEET_ALLOWED_MODELS", "sd15, sdxl,")
    monkeypatch.setenv("FLEET_MAX_SIDE", "1024")
    s = ProducerSettings()
    assert s.backend_url == "redis://h:1/3"
    assert s.model_routes == {"flux": "fleet.big", "sdxl": "fleet.xl"}
    assert s.allowed_models == ("sd15", "sdxl")
    assert s.limits().max_side == 1024
    assert s.limits().allowed_models == ("sd15", "sdxl")


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("FLEET_S3_BUCKET=from-dotenv\nFLEET_MODEL=/models/x\n")
    assert WorkerSettings().s3_bucket == "from-dotenv"
    assert WorkerSettings().served_model == "/models/x"


def test_bad_route_text_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_MODEL_ROUTES", "flux")
    with pytest.raises(ValidationError, match="expected NAME=VALUE pairs"):
        ProducerSettings()


def test_worker_model_name_defaults_to_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_MODEL", "org/model")
    assert WorkerSettings().served_model == "org/model"
    monkeypatch.setenv("FLEET_MODEL_NAME", "sd15")
    assert WorkerSettings().served_model == "sd15"


def test_env_example_lists_every_setting() -> None:
    import runpy

    repo = Path(__file__).parents[2]
    text = (repo / ".env.example").read_text()
    render = runpy.run_path(str(repo / "scripts" / "gen_env_example.py"))["render"]
    assert text == render(), "run scripts/gen_env_example.py"
    for name in WorkerSettings.model_fields:
        assert f"FLEET_{name.upper()}=" in text, name
    for name in ProducerSettings.model_fields:
        assert f"FLEET_{name.upper()}=" in text, name


#: Probe values for settings that accept only some strings (the generic "probe" is refused).
PROBES = {"FLEET_S3_PUBLIC_ENDPOINT_URL": "https://images.example.com",
          "FLEET_WARMUP_SHAPES": "512x512x4"}  # fmt: skip


def _probe_value(annotation: object, default: object) -> str:
    """A value for the variable, different from the field's default, as text."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _probe_value(args[0], default)
    if typing.get_origin(annotation) is typing.Literal:
        return str(next(a for a in args if a != default))
    if len(args) == 1 and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _probe_value(args[0], default)
    if annotation is bool:
        return str(not default).lower()
    if annotation is int:
        return str((default or 0) + 3)
    if annotation is float:
        return str((default or 0.0) + 0.5)
    if typing.get_origin(annotation) is dict:
        return "probe=fleet.probe"
    if typing.get_origin(annotation) is tuple:
        return "probe-a,probe-b"
    return "probe"


def test_every_env_example_name_reaches_its_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each FLEET_* name in .env.example, set to a non-default value, changes its setting."""
    monkeypatch.chdir(tmp_path)
    repo = Path(__file__).parents[2]
    names = re.findall(r"^(FLEET_\w+)=", (repo / ".env.example").read_text(), re.M)
    assert len(names) == len(set(names)) > 50
    fields = {**ProducerSettings.model_fields, **WorkerSettings.model_fields,
              **GatewaySettings.model_fields}  # fmt: skip
    for name in names:
        field_name = name.removeprefix("FLEET_").lower()
        field = fields[field_name]
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        value = PROBES.get(name) or _probe_value(field.annotation, default)
        monkeypatch.setenv(name, value)
        cls: type[ProducerSettings] = (
            WorkerSettings if field_name in WorkerSettings.model_fields
            else GatewaySettings if field_name in GatewaySettings.model_fields
            else ProducerSettings
        )  # fmt: skip
        got = getattr(cls(), field_name)
        if hasattr(got, "get_secret_value"):
            got = got.get_secret_value()
        assert got != default, f"{name}={value} did not reach {cls.__name__}.{field_name}"
        monkeypatch.delenv(name)


def test_settings_that_depend_on_each_other_are_checked_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    WorkerSettings()  # the defaults agree
    monkeypatch.setenv("FLEET_HEARTBEAT_TTL_S", "5")
    with pytest.raises(ValidationError, match="FLEET_HEARTBEAT_TTL_S=5 must exceed"):
        WorkerSettings()
    monkeypatch.delenv("FLEET_HEARTBEAT_TTL_S")
    monkeypatch.setenv("FLEET_VISIBILITY_TIMEOUT_S", "2")
    with pytest.raises(ValidationError, match="FLEET_VISIBILITY_TIMEOUT_S=2 must be at least 4"):
        WorkerSettings()
