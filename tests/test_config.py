import pytest

from rise.config import ConfigError, dump_config, load_config
from rise.embodiment import PRESETS, Embodiment, load_embodiment
from services.policy.server import PolicyConfig


def test_yaml_then_env_then_overrides(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("server:\n  port: 6000\n  max_message_mb: 16\nembodiment: piper_dual\n")
    env = {"RISE_SERVER__PORT": "6001", "RISE_SERVER__AUTH_TOKENS": "[a, b]", "OTHER": "x"}
    config = load_config(PolicyConfig, path, environ=env, overrides={"default_alias": "candidate"})
    assert config.server.port == 6001 and config.server.max_message_mb == 16
    assert config.server.auth_tokens == ["a", "b"] and config.default_alias == "candidate"
    assert "model_name: policy" in dump_config(config)


def test_typos_and_bad_values_are_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  prot: 6000\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(PolicyConfig, path, environ={})
    with pytest.raises(ConfigError, match="port"):
        load_config(PolicyConfig, None, environ={"RISE_SERVER__PORT": "99999"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(PolicyConfig, tmp_path / "missing.yaml", environ={})


def test_embodiments():
    piper = PRESETS["piper_dual"]
    assert (piper.state_dim, piper.action_dim, piper.chunk_length, len(piper.views)) == (14, 14, 50, 3)
    other = piper.model_copy(update={"chunk_length": 25})
    assert piper.differences(other) == ["chunk_length: 25 != 50"]
    with pytest.raises(ValueError, match="unknown embodiment"):
        load_embodiment("nope")
    with pytest.raises(ValueError, match="unique"):
        Embodiment(name="x", views=["a", "a"], image_height=1, image_width=1, state_dim=1, action_dim=1,
                   chunk_length=1, control_hz=1)
