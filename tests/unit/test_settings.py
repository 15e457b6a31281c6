"""Settings come from FLEET_* environment variables with documented defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.settings import ProducerSettings, WorkerSettings


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
