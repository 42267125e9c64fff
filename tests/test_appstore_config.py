"""The AppStore's own config: strict, and it says exactly what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from appstore.config import load_config
from appstore.errors import ConfigError


def test_toml_file_with_overrides_and_derived_paths(tmp_path: Path) -> None:
    """An operator writes a small TOML file; flags override it; a relative data
    dir is relative to the file, not to wherever the service was started."""
    f = tmp_path / "etc" / "appstore.toml"
    f.parent.mkdir()
    f.write_text('data_dir = "data"\nmqtt_port = 1884\nshared_group = "cloud"\n')
    cfg = load_config(f, mqtt_port=1999, http_port=None)
    assert cfg.data_dir == tmp_path / "etc" / "data"
    assert cfg.mqtt_port == 1999 and cfg.http_port == 8080 and cfg.shared_group == "cloud"
    assert cfg.signing_key_path == cfg.data_dir / "keys" / "publisher.pem"
    assert load_config(data_dir=str(tmp_path), shared_group=None).shared_group == "appstore"


def test_json_file_can_disable_shared_subscriptions(tmp_path: Path) -> None:
    """Brokers without $share need shared_group: null."""
    f = tmp_path / "c.json"
    f.write_text('{"data_dir": "/srv/appstore", "shared_group": null}')
    assert load_config(f).shared_group is None


@pytest.mark.parametrize("content, expected", [
    ('{"data_dir": "/x", "mqtt_prot": 1883}', "mqtt_prot = 1883: Extra inputs are not permitted"),
    ('{"data_dir": "/x", "mqtt_port": "abc"}', "mqtt_port = 'abc'"),
    ('{"data_dir": "/x", "http_port": 70000}', "http_port = 70000"),
    ('{"mqtt_port": 1883}', "data_dir: required setting is missing"),
    ('{"data_dir": ', "is not valid json"),
])
def test_bad_config_names_key_value_and_problem(tmp_path: Path, content: str,
                                                expected: str) -> None:
    """A typo in the config must stop the service with the key, the value and
    why, instead of being ignored or crashing later."""
    f = tmp_path / "c.json"
    f.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert expected in err.value.detail
