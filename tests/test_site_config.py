"""Site TOML: validated completely before anything runs; every error names the file and the [section].key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client.site_config import ConfigError, SiteConfig, create_secret_file, default_site_config, load_site_config
from privacy.policy import SitePolicy


def _site(tmp_path: Path, body: str | None = None, *, secret: bool = True) -> Path:
    (tmp_path / "dicom").mkdir(exist_ok=True)
    (tmp_path / "labels.csv").write_text("SOPInstanceUID,label\n", encoding="utf-8")
    if secret and not (tmp_path / "pseudonym.secret").exists():
        create_secret_file(tmp_path / "pseudonym.secret")
    toml = tmp_path / "site.toml"
    toml.write_text(body if body is not None else VALID, encoding="utf-8")
    return toml


VALID = """
[site]
name = "hospital-a"
state_dir = "state"
secret_file = "pseudonym.secret"
device = "cuda:1"

[data]
dicom_dir = "dicom"
labels_csv = "labels.csv"
label_key = "AccessionNumber"
label_column = "label"
modalities = ["cr", "DX"]
image_size = 64
val_fraction = 0.25
seed = 7

[privacy]
max_epsilon = 4.0
"""


def test_valid_config_resolves_relative_paths_and_delegates_privacy(tmp_path: Path) -> None:
    cfg = load_site_config(_site(tmp_path))
    assert isinstance(cfg, SiteConfig)
    assert cfg.name == "hospital-a"
    assert cfg.dicom_dir == (tmp_path / "dicom").resolve()
    assert cfg.labels_csv == (tmp_path / "labels.csv").resolve()
    assert cfg.state_dir == (tmp_path / "state").resolve()
    assert cfg.cache_dir == cfg.state_dir / "cache"  # documented default
    assert cfg.secret_file == (tmp_path / "pseudonym.secret").resolve()
    assert cfg.modalities == ("CR", "DX")
    assert (cfg.image_size, cfg.val_fraction, cfg.seed, cfg.device) == (64, 0.25, 7, "cuda:1")
    assert cfg.label_key == "AccessionNumber" and cfg.task == "classification"
    assert isinstance(cfg.privacy, SitePolicy) and cfg.privacy.max_epsilon == 4.0
    assert cfg.allows_modality("cr") and not cfg.allows_modality("CT") and not cfg.allows_modality(None)


def test_minimal_config_uses_defaults_and_default_policy(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    create_secret_file(tmp_path / "state" / "pseudonym.secret")
    cfg = load_site_config(_site(tmp_path, '[site]\nname = "s"\n[data]\ndicom_dir = "dicom"\n', secret=False))
    assert cfg.labels_csv is None and cfg.modalities == ("CR", "DX") and cfg.image_size == 28
    assert cfg.privacy == SitePolicy.from_table({}, where="x")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[site]\nname = "s"\nnmae = "t"\n[data]\ndicom_dir = "dicom"\n', "[site].nmae: unknown key"),
        ('[site]\nname = "s"\n[data]\ndicom_dir = "dicom"\nimagesize = 28\n', "[data].imagesize: unknown key"),
        ('[site]\nname = "s"\n[data]\ndicom_dir = "dicom"\n[training]\nx = 1\n', "[training]: unknown section"),
    ],
)
def test_unknown_key_or_section_is_named(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_site_config(_site(tmp_path, body))
    assert needle in str(e.value)
    assert str(tmp_path / "site.toml") in str(e.value)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('dicom_dir = "no-such-folder"', "[data].dicom_dir"),
        ('dicom_dir = "dicom"\nlabels_csv = "missing.csv"', "[data].labels_csv"),
        ('dicom_dir = "labels.csv"', "[data].dicom_dir"),  # a file where a folder is needed
    ],
)
def test_missing_path_is_named(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_site_config(_site(tmp_path, f'[site]\nname = "s"\nsecret_file = "pseudonym.secret"\n[data]\n{line}\n'))
    assert key in str(e.value)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('image_size = "28"', "[data].image_size"),
        ("image_size = 28.5", "[data].image_size"),
        ("seed = true", "[data].seed"),
        ('modalities = "CR"', "[data].modalities"),
        ("val_fraction = 1.0", "[data].val_fraction"),
        ('label_key = "PatientName"', "[data].label_key"),
        ('task = "detection"', "[data].task"),
        ("classes = [\"only-one\"]", "[data].classes"),
    ],
)
def test_wrong_type_or_value_is_named(tmp_path: Path, line: str, key: str) -> None:
    body = f'[site]\nname = "s"\nsecret_file = "pseudonym.secret"\n[data]\ndicom_dir = "dicom"\n{line}\n'
    with pytest.raises(ConfigError) as e:
        load_site_config(_site(tmp_path, body))
    assert key in str(e.value)


def test_wrong_type_in_site_section_and_missing_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[site\]\.device"):
        load_site_config(_site(tmp_path, '[site]\nname = "s"\ndevice = "gpu"\n[data]\ndicom_dir = "dicom"\n'))
    with pytest.raises(ConfigError, match=r"\[site\]\.name: missing required key"):
        load_site_config(_site(tmp_path, '[site]\n[data]\ndicom_dir = "dicom"\n'))
    with pytest.raises(ConfigError, match=r"\[data\]\.dicom_dir: missing required key"):
        load_site_config(_site(tmp_path, '[site]\nname = "s"\n'))


def test_privacy_errors_surface_as_config_errors_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_site_config(_site(tmp_path, VALID.replace("max_epsilon = 4.0", 'max_epsilon = "lots"')))
    assert "[privacy]" in str(e.value) and "max_epsilon" in str(e.value)


def test_bad_toml_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_site_config(_site(tmp_path, "[site\nname = 1\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_site_config(tmp_path / "nope.toml")


def test_secret_missing_world_readable_or_short_is_a_clear_error(tmp_path: Path) -> None:
    toml = _site(tmp_path, secret=False)
    with pytest.raises(ConfigError) as e:
        load_site_config(toml)
    assert "[site].secret_file" in str(e.value) and "chmod 600" in str(e.value)
    secret = tmp_path / "pseudonym.secret"
    secret.write_text("x" * 64)
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_site_config(toml)
    os.chmod(secret, 0o600)
    load_site_config(toml)
    secret.write_text("short")
    with pytest.raises(ConfigError, match="fewer than 16 bytes"):
        load_site_config(toml)


def test_create_secret_file_is_private_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "s" / "pseudonym.secret"
    create_secret_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    with pytest.raises(FileExistsError):
        create_secret_file(path)


def test_default_site_config_for_a_first_look(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    cfg = default_site_config(tmp_path / "dicom", state_dir=tmp_path / "st", image_size=32, modalities=["ct"])
    assert cfg.path is None and cfg.labels_csv is None and cfg.image_size == 32 and cfg.modalities == ("CT",)
    assert stat.S_IMODE(cfg.secret_file.stat().st_mode) == 0o600
    again = default_site_config(tmp_path / "dicom", state_dir=tmp_path / "st")
    assert again.secret_file.read_bytes() == cfg.secret_file.read_bytes()  # stable pseudonyms across checks
    with pytest.raises(ConfigError, match="imagesize"):
        default_site_config(tmp_path / "dicom", state_dir=tmp_path / "st", imagesize=3)
    with pytest.raises(ConfigError, match="does not exist"):
        default_site_config(tmp_path / "missing")
