"""The hub token and the safety policy, as the worker reads them (environment and .env)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fleet.settings import WorkerSettings


@pytest.mark.parametrize("name", ["HF_TOKEN", "FLEET_HF_TOKEN"])
def test_the_hub_token_is_read_from_either_name_in_env_or_dotenv_and_masked(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HF_TOKEN", "FLEET_HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    env_file = tmp_path / ".env"
    env_file.write_text(f"{name}=hf_from_dotenv\n")
    settings = WorkerSettings(_env_file=str(env_file))
    assert settings.hf_token is not None
    assert settings.hf_token.get_secret_value() == "hf_from_dotenv"
    assert "hf_from_dotenv" not in repr(settings) and "hf_from_dotenv" not in str(settings)
    monkeypatch.setenv(name, "hf_from_env")  # the environment wins over .env
    assert WorkerSettings(_env_file=str(env_file)).hf_token.get_secret_value() == "hf_from_env"  # type: ignore[union-attr]


def test_no_hub_token_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_TOKEN", "FLEET_HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert WorkerSettings(_env_file=None).hf_token is None


def test_the_safety_policy_is_one_of_three(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings(_env_file=None).safety_policy == "flag"
    monkeypatch.setenv("FLEET_SAFETY_POLICY", "drop")
    assert WorkerSettings(_env_file=None).safety_policy == "drop"
    monkeypatch.setenv("FLEET_SAFETY_POLICY", "ignore")
    with pytest.raises(ValidationError, match="safety_policy"):
        WorkerSettings(_env_file=None)
