"""Configuration: defaults, the TOML file, GATEWAY_* overrides and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config, override


def test_shipped_toml_equals_the_code_defaults() -> None:
    # config/gateway.toml documents every default; it must not drift from the dataclasses.
    assert load_config(DEFAULT_CONFIG_PATH, environ={}) == Config()


def test_environment_overrides_typed_settings() -> None:
    config = load_config(
        environ={
            "GATEWAY_REDIS_URL": "redis://127.0.0.1:6390/1",
            "GATEWAY_VMS_DEFAULT_LIFETIME_S": "600",
            "GATEWAY_EXECUTE_MAX_TIMEOUT_S": "600.5",
            "GATEWAY_SERVER_LISTEN": "127.0.0.1:9000",
            "UNRELATED": "x",
        }
    )
    assert config.redis.url == "redis://127.0.0.1:6390/1"
    assert config.vms.default_lifetime_s == 600
    assert config.execute.max_timeout_s == 600.5
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[vms]\ndriver = 'xen'\n", "vms.driver"),
        ("[vms]\ndefault_lifetime_s = 'long'\n", "vms.default_lifetime_s"),
        ("[vms]\nbogus = 1\n", "unknown setting"),
        ("[nope]\n", "unknown config section"),
        ("[server]\nlisten = 'localhost'\n", "HOST:PORT"),
        ("[netns]\ncidr = '8.8.8.0/24'\n", "private"),
        ("[netns]\nruntime = 'docker'\n", "netns.runtime"),
        ("[netns]\ndisk_mb = 1\n", "netns.disk_mb"),
        ("[netns]\npids_max = 2\n", "netns.pids_max"),
        ("[netns]\nid_base = 0\n", "netns.id_base"),
        ("[netns]\nid_base = 4294000000\n", "netns.id_base"),
        ("[process]\ncidr = '10.0.0.0/16'\n", "127.0.0.0/8"),
        ("[vms]\nmin_lifetime_s = 500\n", "min_lifetime_s"),
        ("not toml = = 1", "gateway"),
        ("[instances]\ndomain = 'Browser'\n", "instances.domain"),
        ("[instances]\ndomain = 'sandbox.localhost'\n", "differ from the sandbox"),
        ("[instances]\ndefault_lifetime_s = 5\n", "instances.default_lifetime_s"),
        ("[instances]\nimages = 1\n", r"tables \[instances.images.<name>\]"),
        ("[instances.images.x]\ndrivers = ['netns']\n", "needs a command and a port"),
        ("[instances.images.x]\ndescription = 'no way to run it'\n", "why it is unavailable"),
        ("[instances.images.x]\ncommand = 'chromium'\n", "list of strings"),
        ("[instances.images.x]\ncolour = 'red'\n", r"unknown setting\(s\) in \[instances.images.x\]"),
        ("[instances.sizes.tiny]\nmemory_mb = 1\n", "instances.sizes.tiny"),
        ("[execute]\nmax_concurrent_per_vm = 0\n", "execute.max_concurrent_per_vm"),
        ("[edge]\nmax_exchanges_per_vm = -1\n", "edge.max_exchanges_per_vm"),
    ],
)
def test_invalid_settings_name_the_setting(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})


def test_a_catalog_table_replaces_the_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        "[instances.images.kiosk]\ncommand = ['{python}', '-m', 'kiosk']\nport = 8000\ndrivers = ['netns']\n"
        "[instances.sizes.xl]\nvcpu_count = 8\nmemory_mb = 16384\n"
    )
    instances = load_config(path, environ={"GATEWAY_INSTANCES_DOMAIN": "b.example.com"}).instances
    assert set(instances.images) == {"kiosk"}
    assert instances.images["kiosk"].command == ("{python}", "-m", "kiosk")
    assert {name: (s.vcpu_count, s.memory_mb) for name, s in instances.sizes.items()} == {"xl": (8, 16384)}
    assert instances.domain == "b.example.com"


def test_env_values_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"vms\.default_memory_mb"):
        load_config(environ={"GATEWAY_VMS_DEFAULT_MEMORY_MB": "lots"})


def test_override_revalidates() -> None:
    with pytest.raises(ConfigError):
        override(Config(), vms={"driver": "nope"})
    assert override(Config(), vms={"driver": "process"}).vms.driver == "process"
