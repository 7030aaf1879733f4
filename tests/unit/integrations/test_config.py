import pytest

from integrations.config import ConfigError, OperatorConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "gondolin.toml"
    path.write_text(text)
    return path


def test_defaults_have_builtin_profiles():
    cfg = OperatorConfig()
    assert set(cfg.profiles()) == {"offline", "restricted"}
    assert cfg.default_network == "restricted"
    assert not cfg.profiles()["offline"].enabled


def test_toml_file_is_read(tmp_path):
    path = write(tmp_path, f"""
default_image = "default"
[limits]
max_sandboxes = 2
default_ttl_s = 60

[network]
default = "pypi"
[network.profiles.pypi]
allowed_hosts = ["pypi.org", "files.pythonhosted.org"]

[secrets.GITHUB_TOKEN]
hosts = ["api.github.com"]

[[mounts]]
host_path = "{tmp_path}"
mode = "cow"
""")
    cfg = load_config(path)
    assert cfg.limits.max_sandboxes == 2 and cfg.limits.default_ttl_s == 60
    assert cfg.default_network == "pypi"
    assert cfg.profiles()["pypi"].allowed_hosts == ("pypi.org", "files.pythonhosted.org")
    assert cfg.secrets["GITHUB_TOKEN"].hosts == ("api.github.com",)
    assert cfg.mounts[0].mode == "cow"
    assert cfg.secret_value("GITHUB_TOKEN", {"GITHUB_TOKEN": "v"}) == "v"


def test_overrides_merge_with_the_file(tmp_path):
    path = write(tmp_path, "[limits]\nmax_sandboxes = 2\n")
    cfg = load_config(path, limits={"default_ttl_s": 30}, network_profiles={"x": {"allowed_hosts": ["a.com"]}})
    assert cfg.limits.max_sandboxes == 2 and cfg.limits.default_ttl_s == 30
    assert "x" in cfg.profiles()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[limits]\nmax_sandboxes = 0\n", "max_sandboxes"),
        ("unknown_key = 1\n", "unknown_key"),
        ('default_network = "nope"\n', "default_network"),
        ('[network]\ndefault = "restricted"\nbogus = 1\n', "bogus"),
        ('[secrets.X]\nhosts = []\n', "hosts"),
        ('[[mounts]]\nhost_path = "relative"\n', "absolute"),
        ("[limits]\ndefault_cpus = 8\nmax_cpus = 2\n", "default_cpus"),
        ('[network.profiles.p]\nenabled = false\nallowed_hosts = ["a.com"]\n', "enabled"),
        ("not toml [", "TOML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert needle in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
