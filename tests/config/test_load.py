import pytest

from raylt.config import dump_yaml, load_config
from raylt.errors import ConfigError

CONFIGS = ["demo.yaml", "cifar100_lt.yaml", "places_lt.yaml", "imagenet_lt.yaml"]


def write(p, text):
    p.write_text(text)
    return p


def test_layers_merge_in_order_and_overrides_win(tmp_path):
    write(tmp_path / "a.yaml", "embed: {batch_size: 8, shard_size: 100}\ndata: {splits: {train: t.txt, val: v.txt}}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nembed: {batch_size: 16}\ndata: {splits: {val: v2.txt}}\n")
    cfg = load_config(tmp_path / "b.yaml", ["embed.shard_size=7", "name=x"])
    assert cfg.embed.batch_size == 16 and cfg.embed.shard_size == 7 and cfg.name == "x"
    assert dict(cfg.data.splits) == {"train": "t.txt", "val": "v2.txt"}


def test_config_is_frozen():
    import dataclasses

    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed.batch_size = 3
    with pytest.raises(TypeError):
        cfg.data.splits["train"] = "x"  # mappings are read-only too


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("embed: {batch_sise: 3}\n", None, "unknown config key 'embed.batch_sise' in file {f} (did you mean 'embed.batch_size'?)"),
        ("embed: {batch_size: abc}\n", None, "config key 'embed.batch_size' in file {f} must be int, got str 'abc'"),
        ("embed: {batch_size: true}\n", None, "must be int, got bool"),
        ("embed: {precision: fp8}\n", None, "must be one of ['auto', 'fp32', 'bf16', 'fp16']"),
        ("data: {root: '???'}\n", None, "config key 'data.root' is required but not set in file {f}; pass data.root=VALUE"),
        ("data: 3\n", None, "config key 'data' in file {f} must be a mapping"),
        ("{}\n", "embed.nope=1", "unknown config key 'embed.nope' on the command line"),
        ("{}\n", "novalue", "override 'novalue' on the command line is not key=value"),
        ("data: {root: '${RAYLT_TEST_UNSET_VAR}'}\n", None, "uses ${{RAYLT_TEST_UNSET_VAR}}, which is not set"),
        ("embed: [1, 2\n", None, "is not valid YAML"),
    ],
)
def test_bad_config_gives_one_line_naming_key_and_file(tmp_path, text, override, message):
    f = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(f, [override] if override else [])
    msg = str(e.value)
    assert message.format(f=f.resolve()) in msg
    assert "\n" not in msg


def test_env_default_and_value(tmp_path, monkeypatch):
    f = write(tmp_path / "c.yaml", "store: {root: '${RAYLT_T_ROOT:-/default/store}'}\n")
    assert load_config(f).store.root == "/default/store"
    monkeypatch.setenv("RAYLT_T_ROOT", "/env/store")
    assert load_config(f).store.root == "/env/store"


def test_missing_file_and_include_cycle(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "x.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_resolve(name, repo_configs, monkeypatch):
    for var in ("CIFAR100_ROOT", "PLACES_ROOT", "PLACES_LT_SPLITS", "IMAGENET_ROOT", "IMAGENET_LT_SPLITS"):
        monkeypatch.setenv(var, "/data")
    cfg = load_config(repo_configs / name)
    assert cfg.name == name.removesuffix(".yaml")
    assert "name:" in dump_yaml(cfg)


def test_cifar_imbalance_ratio_is_selectable(repo_configs):
    for ir in (100, 50, 10):
        cfg = load_config(repo_configs / "cifar100_lt.yaml", ["data.root=/d", f"data.imbalance_ratio={ir}"])
        assert cfg.data.imbalance_ratio == float(ir)


@pytest.fixture
def repo_configs():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "configs"


def test_a_shipped_config_is_named_without_its_path(repo_configs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: only the shipped configs can answer
    assert load_config("demo") == load_config(repo_configs / "demo.yaml")
    assert load_config("data/demo.yaml", ["seed=3"]) == load_config(repo_configs / "data" / "demo.yaml", ["seed=3"])
    write(tmp_path / "demo", "name: mine\n")  # a file of that name wins over the shipped config
    assert load_config("demo").name == "mine"
    with pytest.raises(ConfigError, match="nope does not exist; `raylt list` shows the shipped configs"):
        load_config("nope")
