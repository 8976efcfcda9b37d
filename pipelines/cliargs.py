"""Argument types for the ``mbpo`` command line: each rejects a bad value early, naming the value
and what is allowed (argparse adds the argument's name and exits with code 2)."""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import unicodedata
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit

from mbpo_core.config import ConfigError, MBPOConfig
from mbpo_core.tracking import check_tracking_uri, redact_uri

from .chain import RUN_NAME_RULE, check_run_name
from .submit import TOKEN_ENV


def device(value: str) -> str:
    if value not in ("cpu", "cuda") and not re.fullmatch(r"cuda:[0-9]+", value):
        raise argparse.ArgumentTypeError(f"--device {value!r}: allowed cpu, cuda or cuda:N")
    return value


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer; allowed 1 or more") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def _int_in(lo: int, hi: int):  # noqa: ANN202 (an argparse type)
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not an integer; allowed {lo} to {hi}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{n} is out of range; allowed {lo} to {hi}")
        return n
    return parse


# numpy / gymnasium / torch seeds; the configuration's own range (MBPOConfig.seed)
SEED_MAX = next(f.metadata["hi"] for f in fields(MBPOConfig) if f.name == "seed")
MAX_TOTAL_STEPS = 10**9  # exact in a KFP pipeline parameter (a double), far beyond any MBPO run
MAX_THREADS = 1024
seed = _int_in(0, SEED_MAX)
total_steps = _int_in(1, MAX_TOTAL_STEPS)
env_steps = _int_in(0, MAX_TOTAL_STEPS)
threads = _int_in(1, MAX_THREADS)


def _text_ok(value: str) -> bool:
    """No NUL, newline or other control characters (they break paths, keys, names and logs)."""
    return not any(unicodedata.category(c) == "Cc" for c in value)


def _writable_folder_path(value: str, path: Path, what: str) -> None:
    """``path`` is (or can be made) a folder: not a file, under a writable folder."""
    try:
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{value!r} exists and is not a folder; allowed "
                                             f"{what}")
        parent = path
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{value!r}: {str(parent)!r} is not a folder; "
                                             f"allowed {what}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{value!r}: {str(parent)!r} is not writable")
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{value!r} cannot be used: {e.strerror or e}") from None


def out_dir(value: str) -> Path:
    what = "a folder path (created if missing)"
    if not value.strip() or not _text_ok(value):
        raise argparse.ArgumentTypeError(f"{value!r}: allowed {what}")
    _writable_folder_path(value, Path(value), what)
    return Path(value)


def yaml_file(value: str) -> Path:
    """-o of compile: KFP writes a package only to a .yaml or .yml file."""
    what = "a .yaml or .yml file path (its folder is created if missing)"
    if not value.strip() or not _text_ok(value) or not value.endswith((".yaml", ".yml")):
        raise argparse.ArgumentTypeError(f"{value!r}: allowed {what}")
    path = Path(value)
    try:
        is_dir = path.is_dir()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{value!r} cannot be used: {e.strerror or e}") from None
    if is_dir:
        raise argparse.ArgumentTypeError(f"{value!r} is a folder; allowed {what}")
    _writable_folder_path(value, path.parent, what)
    return path


def existing_file(value: str) -> Path:
    try:
        ok = _text_ok(value) and Path(value).is_file()
    except OSError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{value!r}: no such file; allowed an existing state.pt")
    return Path(value)


_STORE_FORMS = "a local folder, file:///path or s3://bucket/prefix"


def store_url(value: str) -> str:
    if not value.strip() or not _text_ok(value):
        raise argparse.ArgumentTypeError(f"{redact_uri(value)!r}: allowed {_STORE_FORMS}")
    try:
        parts = urlsplit(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{redact_uri(value)!r} is not a valid URL ({e}); allowed "
                                         f"{_STORE_FORMS}") from None
    if parts.scheme == "s3":
        if "@" in parts.netloc:
            raise argparse.ArgumentTypeError(
                f"{redact_uri(value)!r} has credentials in it; set AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY in the environment instead")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", parts.netloc):
            raise argparse.ArgumentTypeError(f"{value!r}: an s3:// URL needs a bucket name "
                                             "(letters, digits, '.', '_', '-'), e.g. "
                                             "s3://my-bucket/mbpo")
        return value
    if parts.scheme not in ("", "file"):
        raise argparse.ArgumentTypeError(f"{redact_uri(value)!r}: scheme {parts.scheme!r} is not "
                                         f"supported; allowed {_STORE_FORMS}")
    path = parts.path if parts.scheme == "file" else value
    if not path:
        raise argparse.ArgumentTypeError(f"{value!r}: no folder; allowed {_STORE_FORMS}")
    _writable_folder_path(value, Path(path).expanduser(), _STORE_FORMS)
    return value


def run_ref(value: str) -> str:
    """--resume-from of run/submit: a run URL (STORE/runs/NAME) or a local --out folder."""
    allowed = "a run URL (STORE/runs/NAME: a local folder, file:// or s3://) or a `mbpo run` --out folder"
    try:
        scheme = urlsplit(value).scheme if value.strip() and _text_ok(value) else None
    except ValueError:
        scheme = None
    if scheme not in ("", "file", "s3"):
        raise argparse.ArgumentTypeError(f"{redact_uri(value)!r}: allowed {allowed}")
    return value


def run_name(value: str) -> str:
    try:
        return check_run_name(value)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"{value!r}: allowed {RUN_NAME_RULE}") from None


def tracking_uri(value: str) -> str:
    if not value:
        return value  # '' = the default, as if not given
    try:
        return check_tracking_uri(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("tracking URI ")) from None


def experiment_name(value: str) -> str:
    """An MLflow or KFP experiment name."""
    if not value.strip() or len(value) > 500 or not _text_ok(value):
        raise argparse.ArgumentTypeError(f"{value!r}: allowed a name of 1-500 characters, not "
                                         "only spaces, without control characters")
    return value


def registered_model(value: str) -> str:
    if value == "":
        return value  # no registration
    norm = posixpath.normpath(value)
    if (not value.strip() or len(value) > 500 or not _text_ok(value) or "/" in value
            or ":" in value or norm != value or norm in (".", "..")):
        raise argparse.ArgumentTypeError(f"{value!r}: allowed '' (register nothing) or a Model "
                                         "Registry name of 1-500 characters without '/', ':' or "
                                         "control characters, other than '.' and '..'")
    return value


_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[A-Za-z0-9=_-]+)?")


def image_ref(value: str) -> str:
    if not _IMAGE.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: allowed an image reference [REGISTRY[:PORT]/]NAME[:TAG][@DIGEST] "
            "(lowercase name, no spaces), e.g. ghcr.io/mbpo-project/mbpo:0.1.0")
    return value


def kfp_host(value: str) -> str:
    allowed = "an http:// or https:// URL of the KFP API, e.g. https://kfp.example.com"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or not _text_ok(value) or any(c.isspace() for c in value)):
        raise argparse.ArgumentTypeError(f"{redact_uri(value)!r}: allowed {allowed}")
    if parts.username or parts.password:
        raise argparse.ArgumentTypeError(f"{redact_uri(value)!r} has credentials in it; set "
                                         f"${TOKEN_ENV} in the environment instead")
    return value


def namespace(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?", value):
        raise argparse.ArgumentTypeError(f"{value!r}: allowed a Kubernetes namespace: 1-63 "
                                         "lowercase letters, digits or '-', starting and ending "
                                         "with a letter or digit")
    return value


def rounds(value: str) -> int:
    n = positive(value)
    if n > MAX_ROUNDS_PER_RUN:
        raise argparse.ArgumentTypeError(
            f"{n} rounds in one pipeline run is too large to submit (KFP on Argo); "
            f"allowed 1-{MAX_ROUNDS_PER_RUN}: longer training is a chain of runs")
    return n


# About 19.5 KB of compiled spec per round; 25 rounds keep the Argo object (about 2.85x the spec)
# under 1.5 MiB, etcd's default limit.
MAX_ROUNDS_PER_RUN = 25
