"""Hospital-owned site configuration (TOML): where the data is, how it is labelled, and where state lives.

The file belongs to the hospital, not to the consortium. It is validated completely before anything runs: an unknown
section or key, a wrong type, or a path that does not exist is a :class:`ConfigError` whose message names the file,
the ``[section].key`` and what to do, so a typo can never silently fall back to a default.

Sections are declared in :data:`SECTIONS`, a registry of ``{section: {key: _Key}}`` (plus delegated sections such
as ``[privacy]``, parsed only by :meth:`privacy.policy.SitePolicy.from_table`), so a later section (``[runs]``) is
one more entry, not a new parser.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import tempfile
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # pragma: no cover - typing only
    from client.pacs.source import PacsSource
    from privacy.policy import SitePolicy

LABEL_KEYS: tuple[str, ...] = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber")
TASKS: tuple[str, ...] = ("classification", "segmentation")
#: ``[data].kind``: what one example is — a 2D image (one file) or a 3D volume (one DICOM series)
DATA_KINDS: tuple[str, ...] = ("images", "volumes")
ANY_MODALITY = "*"
MIN_SECRET_BYTES = 16
#: Site name of a first look (``atoll site check --data``), which has no site TOML and so no name.
FIRST_LOOK_NAME = "first-look"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MODALITY = re.compile(r"^([A-Z0-9]{1,16}|\*)$")


#: Refusal code of a round that fails on the site's own configuration (the message stays in the site log).
SITE_CONFIG_INVALID = "SITE_CONFIG_INVALID"


class ConfigError(ValueError):
    """Invalid site configuration; the message names the file, the ``[section].key`` and what to do.

    ``code`` is what a round refused for this reason answers (``POLICY_INVALID`` for the ``[privacy]`` section),
    so the lead sees which rule failed instead of a bare SITE_ERROR; the message itself may name paths and
    stays on the site.
    """

    def __init__(self, message: str, code: str = SITE_CONFIG_INVALID) -> None:
        super().__init__(message)
        self.code = code


#: Command-line flags of ``atoll site check --data`` (first look, no site TOML) per ``[data]`` key: messages
#: cite what the user typed.
FIRST_LOOK_FLAGS: dict[str, str] = {
    "dicom_dir": "--data", "labels_csv": "--labels", "label_key": "--label-key", "label_column": "--label-column",
    "classes": "--classes", "modalities": "--modalities", "image_size": "--image-size",
}


def setting_name(cfg: "SiteConfig", key: str) -> str:
    """How to name setting ``key`` in a message: ``[data].key`` for a site TOML, the flag for a first look."""
    if cfg.path is None and key in FIRST_LOOK_FLAGS:
        return FIRST_LOOK_FLAGS[key]
    section = "site" if key in SECTIONS["site"] else "data"
    return f"[{section}].{key}"


@dataclass(frozen=True)
class SiteConfig:
    """Validated site configuration; every path is absolute. See ``docs/site-data.md`` for each key."""

    path: Path | None
    name: str
    state_dir: Path
    secret_file: Path
    signing_key: Path | None
    device: str
    dicom_dir: Path
    labels_csv: Path | None
    label_key: str
    label_column: str
    task: str
    modalities: tuple[str, ...]
    cache_dir: Path
    image_size: int
    val_fraction: float
    seed: int
    privacy: "SitePolicy"
    classes: tuple[str, ...] | None = None
    source: "PacsSource | None" = None  # [data.source]: dicom_dir is then the PACS mirror in state_dir
    kind: str = "images"
    labels: tuple[str, ...] | None = None  # volumes: names of mask values 1..K (segmentation)

    def allows_modality(self, modality: str | None) -> bool:
        """True when ``modality`` is in the allowed list (``"*"`` allows any, including a missing one)."""
        if ANY_MODALITY in self.modalities:
            return True
        return bool(modality) and modality.upper() in self.modalities


# --------------------------------------------------------------------------------------------------------------
# Key registry
# --------------------------------------------------------------------------------------------------------------
Parser = Callable[[Any, str, "_Ctx"], Any]


@dataclass(frozen=True)
class _Key:
    parse: Parser
    required: bool = False


@dataclass(frozen=True)
class _Ctx:
    """Where relative paths resolve (the TOML's folder) and how to name the file in messages."""

    base: Path
    file: str


def _fail(ctx: _Ctx, where: str, msg: str) -> ConfigError:
    return ConfigError(f"{ctx.file}: {where}: {msg}" if where else f"{ctx.file}: {msg}")


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(v), type(v).__name__
    )


def _str(v: Any, where: str, ctx: _Ctx) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _fail(ctx, where, f"expected a non-empty string, got {_type_name(v)} {v!r}")
    return v.strip()


def _int(lo: int | None = None, hi: int | None = None) -> Parser:
    def parse(v: Any, where: str, ctx: _Ctx) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(ctx, where, f"expected an integer, got {_type_name(v)} {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _fail(ctx, where, f"must be between {lo} and {hi}, got {v}")
        return v

    return parse


def _fraction(v: Any, where: str, ctx: _Ctx) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(ctx, where, f"expected a number in [0, 1), got {_type_name(v)} {v!r}")
    if not 0.0 <= float(v) < 1.0:
        raise _fail(ctx, where, f"must be in [0, 1) (share of patients held out for validation), got {v}")
    return float(v)


def _choice(options: tuple[str, ...]) -> Parser:
    def parse(v: Any, where: str, ctx: _Ctx) -> str:
        s = _str(v, where, ctx)
        if s not in options:
            raise _fail(ctx, where, f"must be one of {', '.join(options)}, got {s!r}")
        return s

    return parse


def _device(v: Any, where: str, ctx: _Ctx) -> str:
    s = _str(v, where, ctx)
    if not _DEVICE.match(s):
        raise _fail(ctx, where, f"must be auto, cpu, mps, cuda or cuda:N, got {s!r}")
    return s


def _modalities(v: Any, where: str, ctx: _Ctx) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise _fail(ctx, where, f'expected a non-empty array of modality codes such as ["CR", "DX"], got {v!r}')
    out = []
    for item in v:
        if not isinstance(item, str) or not _MODALITY.match(item.strip().upper()):
            raise _fail(ctx, where, f'each entry must be a DICOM modality code like "CR" (or "*" for any), got {item!r}')
        out.append(item.strip().upper())
    return tuple(dict.fromkeys(out))


def _classes(v: Any, where: str, ctx: _Ctx) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(c, str) and c.strip() for c in v):
        raise _fail(ctx, where, f'expected an array of at least two class names, e.g. ["normal", "pneumonia"], got {v!r}')
    names = tuple(c.strip() for c in v)
    if len(set(names)) != len(names):
        raise _fail(ctx, where, "class names must be unique")
    return names


def _labels(v: Any, where: str, ctx: _Ctx) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(c, str) and c.strip() for c in v):
        raise _fail(ctx, where, f'expected an array of label names (mask value 1, 2, ...), e.g. ["anterior", '
                                f'"posterior"], got {v!r}')
    names = tuple(c.strip() for c in v)
    if len(set(names)) != len(names):
        raise _fail(ctx, where, "label names must be unique")
    return names


def _path(*, must_exist: bool, kind: str = "any") -> Parser:
    def parse(v: Any, where: str, ctx: _Ctx) -> Path:
        s = _str(v, where, ctx)
        p = Path(os.path.expanduser(s))
        try:
            p = (p if p.is_absolute() else ctx.base / p).resolve()
            exists = p.exists()
        except (RuntimeError, OSError) as e:  # Python < 3.13 raises RuntimeError on a loop, later OSError
            if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
                raise _fail(ctx, where, f"{s} is a symbolic link loop; point it at the real folder or file") from None
            raise _fail(ctx, where, f"cannot resolve {s} ({e.strerror or type(e).__name__})") from None
        if must_exist:
            if not exists:
                raise _fail(ctx, where, f"path does not exist: {p} (relative paths resolve against {ctx.base})")
            if kind == "dir" and not p.is_dir():
                raise _fail(ctx, where, f"expected a folder, got a file: {p}")
            if kind == "file" and not p.is_file():
                raise _fail(ctx, where, f"expected a file, got a folder: {p}")
        return p

    return parse


def _source(v: Any, where: str, ctx: _Ctx) -> Any:
    """``[data.source]``: parsed by its owner, client.pacs.source (imported lazily; it imports this module)."""
    from client.pacs.source import parse_source

    return parse_source(v, where, ctx)


SECTIONS: dict[str, dict[str, _Key]] = {
    "site": {
        "name": _Key(_str, required=True),
        "state_dir": _Key(_path(must_exist=False)),
        "secret_file": _Key(_path(must_exist=False)),
        "signing_key": _Key(_path(must_exist=False)),
        "device": _Key(_device),
    },
    "data": {
        "dicom_dir": _Key(_path(must_exist=True, kind="dir")),  # required unless [data.source] is given
        "source": _Key(_source),
        "labels_csv": _Key(_path(must_exist=True, kind="file")),
        "label_key": _Key(_choice(LABEL_KEYS)),
        "label_column": _Key(_str),
        "classes": _Key(_classes),
        "task": _Key(_choice(TASKS)),
        "kind": _Key(_choice(DATA_KINDS)),
        "labels": _Key(_labels),
        "modalities": _Key(_modalities),
        "cache_dir": _Key(_path(must_exist=False)),
        "image_size": _Key(_int(4, 1024)),
        "val_fraction": _Key(_fraction),
        "seed": _Key(_int(0, 2**63 - 1)),
    },
}
"""Sections parsed here. Delegated sections (parsed by their owner) are listed in :data:`DELEGATED_SECTIONS`."""

DELEGATED_SECTIONS: tuple[str, ...] = ("privacy",)

DEFAULTS: dict[str, Any] = {
    "device": "auto",
    "label_key": "SOPInstanceUID",
    "label_column": "label",
    "task": "classification",
    "modalities": ("CR", "DX"),
    "image_size": 28,
    "val_fraction": 0.2,
    "seed": 0,
}


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def load_site_config(path: str | Path) -> SiteConfig:
    """Parse and validate a site TOML file; nothing is created or read besides the file and the secret's metadata.

    Raises
    ------
    ConfigError: naming the file, the ``[section].key`` and what to do (the ``[privacy]`` section's
        ``PolicyError`` is re-raised as ``ConfigError`` with the same message).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{p}: site config file not found; pass --config with the path to your site.toml")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e}); fix the syntax at that line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the file ({e.__class__.__name__}); check permissions and encoding") from None
    p = p.resolve()
    ctx = _Ctx(base=p.parent, file=str(p))

    known = set(SECTIONS) | set(DELEGATED_SECTIONS)
    for section, table in raw.items():
        if section not in known:
            raise _fail(ctx, f"[{section}]", f"unknown section; allowed sections are {', '.join(sorted(known))}")
        if not isinstance(table, dict):
            raise _fail(ctx, f"[{section}]", f"expected a table, got {_type_name(table)}; write it as [{section}]")

    values: dict[str, Any] = {}
    for section, keys in SECTIONS.items():
        table = raw.get(section, {})
        for key in table:
            if key not in keys:
                raise _fail(ctx, f"[{section}].{key}", f"unknown key; allowed keys in [{section}] are {', '.join(keys)}")
        for key, spec in keys.items():
            where = f"[{section}].{key}"
            if key in table:
                values[key] = spec.parse(table[key], where, ctx)
            elif spec.required:
                raise _fail(ctx, where, f"missing required key; add `{key} = ...` under [{section}]")

    state_dir = values.get("state_dir", (ctx.base / "state").resolve())
    source, dicom_dir = _data_location(values, state_dir, ctx)
    secret_file = values.get("secret_file", state_dir / "pseudonym.secret")
    check_secret_file(secret_file, where=f"{ctx.file}: [site].secret_file")
    return SiteConfig(
        path=p,
        name=values["name"],
        state_dir=state_dir,
        secret_file=secret_file,
        signing_key=values.get("signing_key"),
        device=values.get("device", DEFAULTS["device"]),
        dicom_dir=dicom_dir,
        labels_csv=values.get("labels_csv"),
        label_key=values.get("label_key", DEFAULTS["label_key"]),
        label_column=values.get("label_column", DEFAULTS["label_column"]),
        task=values.get("task", DEFAULTS["task"]),
        modalities=values.get("modalities", DEFAULTS["modalities"]),
        cache_dir=values.get("cache_dir", state_dir / "cache"),
        image_size=values.get("image_size", DEFAULTS["image_size"]),
        val_fraction=values.get("val_fraction", DEFAULTS["val_fraction"]),
        seed=values.get("seed", DEFAULTS["seed"]),
        privacy=_load_policy(raw.get("privacy", {}), where=f"{p} [privacy]"),
        classes=values.get("classes"),
        source=source,
        kind=_kind(values, ctx),
        labels=values.get("labels"),
    )


def _data_location(values: dict[str, Any], state_dir: Path, ctx: _Ctx) -> tuple[Any, Path]:
    """``[data].dicom_dir`` (a folder), or ``[data.source]`` (a PACS, mirrored inside ``state_dir``): one of them."""
    source = values.get("source")
    if source is None:
        if "dicom_dir" not in values:
            raise _fail(ctx, "[data].dicom_dir", "missing required key; add `dicom_dir = ...` under [data] (a "
                                                 "folder of DICOM files), or a [data.source] table to pull from a PACS")
        return None, values["dicom_dir"]
    if "dicom_dir" in values:
        raise _fail(ctx, "[data].dicom_dir", "not allowed with [data.source]: the images are pulled into the "
                                             "site's state folder; remove dicom_dir (or remove [data.source])")
    from client.pacs.mirror import mirror_dir
    from client.pacs.source import with_default_modalities

    return with_default_modalities(source, values.get("modalities", DEFAULTS["modalities"])), mirror_dir(state_dir)


def _kind(values: dict[str, Any], ctx: _Ctx) -> str:
    """``[data].kind`` (images or volumes) must agree with ``[data].task``: segmentation is of volumes here."""
    kind = values.get("kind", "volumes" if values.get("task") == "segmentation" else "images")
    if values.get("task", DEFAULTS["task"]) == "segmentation" and kind != "volumes":
        raise _fail(ctx, "[data].kind", 'segmentation sites hold 3D series: set kind = "volumes"')
    if kind == "volumes" and values.get("task", DEFAULTS["task"]) != "segmentation":
        raise _fail(ctx, "[data].task", 'a volume site is labelled for segmentation: set task = "segmentation" '
                                        '(3D classification is not supported yet)')
    if "labels" in values and kind != "volumes":
        raise _fail(ctx, "[data].labels", "names mask values of a volume site; use [data].classes for images")
    return kind


def _load_policy(table: Mapping[str, Any], where: str) -> "SitePolicy":
    """Delegate ``[privacy]`` to its owner (imported lazily: the policy module is the privacy room's)."""
    from privacy.policy import PolicyError, SitePolicy

    try:
        return SitePolicy.from_table(dict(table), where=where)
    except PolicyError as e:
        raise ConfigError(str(e), code=e.code) from None


def check_secret_file(path: Path, *, where: str) -> None:
    """Refuse a missing, too short, or group/world-accessible pseudonym secret (it keys every patient pseudonym)."""
    fix = (
        f"create it with: python -c \"import secrets,sys; sys.stdout.write(secrets.token_hex(32))\" > {path} "
        f"&& chmod 600 {path}"
    )
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{where}: pseudonym secret not found at {path}; {fix}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read pseudonym secret {path} ({e.__class__.__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: {path} is not a regular file; {fix}")
    if os.name == "posix" and st.st_mode & 0o077:
        raise ConfigError(
            f"{where}: {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
        )
    if st.st_size < MIN_SECRET_BYTES:
        raise ConfigError(f"{where}: {path} holds fewer than {MIN_SECRET_BYTES} bytes; {fix}")


def create_secret_file(path: Path) -> None:
    """Create a fresh 32-byte (hex) pseudonym secret with mode 0600, refusing to overwrite an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _private_temp_root() -> Path:
    """``<tmp>/atoll-site-<uid>``, private (0700); refused if it is a link or another user's folder."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    root = Path(tempfile.gettempdir()) / f"atoll-site-{uid}"
    root.mkdir(mode=0o700, exist_ok=True)
    st = root.lstat()
    if os.name == "posix":
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            raise ConfigError(f"{root} is not a folder owned by this user; remove it, or use --config with a state_dir")
        if st.st_mode & 0o077:
            os.chmod(root, 0o700)
    return root


def default_site_config(dicom_dir: str | Path, labels_csv: str | Path | None = None, **overrides: Any) -> SiteConfig:
    """Configuration for a first look (``atoll site check --data DIR``) without a site TOML.

    State (pseudonym secret, cache) goes to a private folder under the system temp dir keyed by a hash of the data
    folder's path, so repeated checks reuse the cache and give the same split; the secret is created (0600) when
    absent. ``overrides`` are :class:`SiteConfig` field names (e.g. ``image_size=64``, ``modalities=("*",)``).
    """
    ctx = _Ctx(base=Path.cwd(), file="--data")
    data = _path(must_exist=True, kind="dir")(str(dicom_dir), "", ctx)  # first look: messages cite the flag
    labels = None
    if labels_csv is not None:
        labels = _path(must_exist=True, kind="file")(str(labels_csv), "", _Ctx(Path.cwd(), "--labels"))
    names = {f.name for f in fields(SiteConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"default_site_config: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    if "state_dir" in overrides:
        state_dir = Path(overrides.pop("state_dir"))
    else:
        state_dir = _private_temp_root() / hashlib.sha256(str(data).encode()).hexdigest()[:16]
    secret_file = Path(overrides.pop("secret_file", state_dir / "pseudonym.secret"))
    if not secret_file.exists():
        create_secret_file(secret_file)
    check_secret_file(secret_file, where="default site config")
    policy = overrides.pop("privacy", None) or _load_policy({}, where="default site config [privacy]")
    cfg = SiteConfig(
        path=None,
        name=FIRST_LOOK_NAME,
        state_dir=state_dir,
        secret_file=secret_file,
        signing_key=None,
        device=DEFAULTS["device"],
        dicom_dir=data,
        labels_csv=labels,
        label_key=DEFAULTS["label_key"],
        label_column=DEFAULTS["label_column"],
        task=DEFAULTS["task"],
        modalities=DEFAULTS["modalities"],
        cache_dir=Path(overrides.pop("cache_dir", state_dir / "cache")),
        image_size=DEFAULTS["image_size"],
        val_fraction=DEFAULTS["val_fraction"],
        seed=DEFAULTS["seed"],
        privacy=policy,
    )
    if "modalities" in overrides:
        overrides["modalities"] = tuple(m.upper() for m in overrides["modalities"])
    return replace(cfg, **overrides)
