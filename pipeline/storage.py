"""Where the jobs' files live: a local path, or a URI on any filesystem pyarrow or fsspec knows.

`resolve("s3://bucket/data")` gives a `Location`: a pyarrow filesystem and a path inside it. S3,
GCS, HDFS and Azure go through pyarrow's own filesystems (`pyarrow.fs.FileSystem.from_uri`); any
other scheme with an fsspec implementation installed (`hf://` from huggingface_hub, `memory://`,
`gcsfs`' or `s3fs`' own schemes, ...) is wrapped with `pyarrow.fs.PyFileSystem(FSSpecHandler)`.
Credentials come from each store's standard environment and config files (for S3 the
`AWS_*` variables, `~/.aws/`, an instance role; `AWS_ENDPOINT_URL` points it at another
S3-compatible server): nothing of them is in a config file, a manifest or a log line.

A `Location` travels to Ray tasks as its URI and opens the store again on whatever node it lands,
with that node's credentials (`__reduce__`): no client or secret is pickled.

`shown(uri)` is what messages print: a URI without user, password or query values.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from pipeline.errors import UserError

# Schemes pyarrow opens with its own C++ filesystems; everything else goes through fsspec.
PYARROW_SCHEMES = frozenset({"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_MAGIC = re.compile(r"[*?\[]")

FSSPEC_PACKAGES = {
    "hf": "huggingface_hub",
    "az": "adlfs",
    "http": "aiohttp",
    "https": "aiohttp",
}


class StorageError(UserError):
    """A path or URI that cannot be used: no filesystem for its scheme, a bucket or file that
    does not exist, no permission. The message names the setting, the URI (credentials removed)
    and the fix."""


def scheme_of(uri: str) -> str:
    """`s3` for `s3://b/k`, `` for a local path (`file://` counts as local)."""
    m = _SCHEME.match(str(uri))
    scheme = m.group(1).lower() if m else ""
    return "" if scheme == "file" else scheme


def is_remote(uri: str) -> bool:
    return scheme_of(uri) != ""


def shown(uri: str) -> str:
    """`uri` as messages and manifests print it: no user, password or query string values."""
    uri = str(uri)
    if not is_remote(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    query = "&".join(f"{q.split('=', 1)[0]}=..." for q in parts.query.split("&") if q)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# Query keys that carry secrets in some filesystems' URIs (pyarrow's S3, fsspec's stores).
_SECRET_KEYS = re.compile(r"(key|secret|token|password|passwd|credential|signature|sig|sas)", re.I)


def uri_problem(uri: str, setting: str) -> str | None:
    """Why `uri` cannot be used as `setting` without opening it, or None: a scheme with no
    filesystem installed, or credentials written into the URI (they would end up in job.json,
    the manifest and the logs; each store's environment or config files hold them instead)."""
    uri = str(uri)
    scheme = scheme_of(uri)
    if not scheme:
        return None
    parts = urlsplit(uri)
    secret_query = [q.split("=", 1)[0] for q in parts.query.split("&") if q and _SECRET_KEYS.search(q.split("=", 1)[0])]
    if parts.password or parts.username or secret_query:
        return (f"{setting}: {shown(uri)} holds credentials; remove them from the URI and give them the store's "
                f"standard way ({access_hint(uri)})")
    if scheme in PYARROW_SCHEMES:
        return None
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = FSSPEC_PACKAGES.get(scheme, exc.name or f"the fsspec implementation of {scheme}://")
        return f"{setting}: {shown(uri)} needs a filesystem for {scheme}:// that is not installed: pip install {package}"
    except ValueError:
        return (f"{setting}: no filesystem is known for {scheme}:// in {shown(uri)}; use a local path, s3://, "
                "gs://, hf:// or a scheme whose fsspec package is installed")
    return None


def has_glob(spec: str) -> bool:
    return bool(_MAGIC.search(str(spec)))


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem. `uri` is how the user (or a join) named it, and is
    what a Ray task re-opens the store from; `path` is the filesystem's own path. `listed`: what
    the listing or lookup that found the file (`expand`, `files`) said of it (its size and write
    time), so that a caller needs no request of its own for them; None for a location made any
    other way, and after it travels (a task asks the store again)."""

    uri: str
    path: str
    filesystem: pafs.FileSystem = field(repr=False, compare=False)
    listed: pafs.FileInfo | None = field(default=None, repr=False, compare=False)

    def __reduce__(self):
        return (resolve, (self.uri,))

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def shown(self) -> str:
        return shown(self.uri)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def join(self, *parts: str) -> Location:
        parts = [p.strip("/") for p in parts if p]
        if not parts:
            return self
        path = posixpath.join(self.path, *parts) if not self.is_local else os.path.join(self.path, *parts)
        return Location(_join_uri(self.uri, parts), path, self.filesystem)

    def relative_to(self, other: Location) -> str:
        """This location's path below `other` (posix separators)."""
        rel = posixpath.relpath(_posix(self.path), _posix(other.path))
        if rel.startswith(".."):
            raise ValueError(f"{self.shown} is not below {other.shown}")
        return rel

    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def files(self, suffix: str = "") -> list[Location]:
        """Every file below this folder whose name ends with `suffix`, sorted by path."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        found = [
            i
            for i in self.filesystem.get_file_info(selector)
            if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
        ]
        return [replace(self._below(i.path), listed=i) for i in sorted(found, key=lambda i: i.path)]

    def children(self) -> list[Location]:
        """The entries directly in this folder (files and folders), sorted by name."""
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return [self._below(i.path) for i in sorted(self.filesystem.get_file_info(selector), key=lambda i: i.path)]

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Writes the whole file so that no reader sees it half-written: on a local disk a hidden
        temporary file renamed into place, on an object store one PUT (objects appear whole)."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = os.path.join(os.path.dirname(self.path), f".{self.name}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return
        self.filesystem.create_dir(posixpath.dirname(self.path), recursive=True)
        with self.filesystem.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Removes this file or folder if it exists."""
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

    def _below(self, path: str) -> Location:
        rel = posixpath.relpath(_posix(path), _posix(self.path))
        return self.join(*rel.split("/")) if rel != "." else self


def resolve(uri: str, setting: str = "path") -> Location:
    """The `Location` of `uri` (a local path, `file://`, or any scheme with a filesystem). Raises
    `StorageError` naming `setting` when no filesystem is installed for its scheme or the URI is
    malformed. Nothing is read or written."""
    uri = str(uri)
    scheme = scheme_of(uri)
    if not scheme:
        local = uri[len("file://"):] if uri.lower().startswith("file://") else uri
        path = os.path.abspath(os.path.expanduser(local))
        return Location(path, path, pafs.LocalFileSystem())
    if scheme in PYARROW_SCHEMES:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError/NotImplementedError
            raise StorageError(f"{setting}: cannot open {shown(uri)}: {_first_line(exc)}") from None
        return Location(uri.rstrip("/") if path else uri, path.rstrip("/"), fs)
    return _fsspec_location(uri, scheme, setting)


def expand(spec: str, setting: str = "input", suffix: str = ".parquet") -> list[Location]:
    """The files `spec` names: a file, a folder (every `*suffix` below it) or a glob pattern
    (`**` crosses folders). Raises `StorageError` when it names nothing or cannot be listed."""
    if has_glob(spec):
        base_spec, pattern = _split_glob(spec)
        base = resolve(base_spec, setting)
        try:
            below = base.files()
        except OSError as exc:
            raise StorageError(f"{setting}: cannot list '{shown(spec)}': {_first_line(exc)} "
                               f"({access_hint(base.uri)})") from None
        # Hidden names are matched only by a pattern that names them (`.*`), as in a shell.
        names_hidden = pattern.startswith(".") or "/." in pattern
        matched = [f for f in below
                   if (names_hidden or _visible(f.relative_to(base))) and _glob_match(f.relative_to(base), pattern)]
        if not matched:
            raise StorageError(f"{setting}: the pattern '{shown(spec)}' matches no file")
        return matched
    location = resolve(spec, setting)
    try:
        info = location.info()
    except OSError as exc:
        raise StorageError(f"{setting}: cannot read '{location.shown}': {_first_line(exc)} ({access_hint(location.uri)})") from None
    if info.type == pafs.FileType.File:
        return [replace(location, listed=info)]
    if info.type == pafs.FileType.Directory:
        found = [f for f in location.files(suffix) if _visible(f.relative_to(location))]
        if not found:
            raise StorageError(f"{setting}: the folder '{location.shown}' holds no *{suffix} file")
        return found
    raise StorageError(f"{setting}: '{location.shown}' does not exist (give a Parquet file, a folder or a glob)")


def common_root(uris: list[str]) -> str:
    """The deepest folder holding every one of `uris` (files): what row ids and fingerprints name
    files relative to, so that the same files give the same names on any store."""
    split = [str(u).split("/")[:-1] for u in uris]
    common = split[0]
    for parts in split[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return "/".join(common) or ("/" if common else "")


def relative_name(uri: str, root: str) -> str:
    """`uri`'s name below `root` (see `common_root`), with posix separators."""
    rel = str(uri)[len(root):].lstrip("/") if root else str(uri)
    return _posix(rel)


def check_writable(location: Location, setting: str = "output.path") -> None:
    """Write a small hidden object below `location` and delete it again, so that a bucket that does
    not exist, missing credentials or no permission to write are refused before any work starts,
    naming `setting`, the URI and the fix. Nothing is left behind."""
    probe = location.join(f".write-probe-{uuid.uuid4().hex}")
    try:
        probe.write_bytes(b"probe")
        probe.delete()
    except OSError as exc:
        raise StorageError(
            f"{setting}: cannot write to '{location.shown}': {_first_line(exc)}; check that the bucket or "
            f"folder exists and that these credentials may write and delete there ({access_hint(location.uri)})"
        ) from None


def access_hint(uri: str) -> str:
    """How a user gives this store its credentials and address (the standard ways, never the config)."""
    scheme = scheme_of(uri)
    if scheme == "s3":
        return ("S3 credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/ or an instance role; "
                "an S3-compatible server is set with AWS_ENDPOINT_URL")
    if scheme in ("gs", "gcs"):
        return "GCS credentials come from GOOGLE_APPLICATION_CREDENTIALS or the machine's service account"
    if scheme == "hf":
        return "Hugging Face credentials come from HF_TOKEN or `hf auth login`"
    if not scheme:
        return "check the path and its permissions"
    return f"see the credentials documentation of the fsspec filesystem for {scheme}://"


def _fsspec_location(uri: str, scheme: str, setting: str) -> Location:
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as exc:
        package = FSSPEC_PACKAGES.get(scheme, exc.name or f"the fsspec implementation of {scheme}://")
        raise StorageError(
            f"{setting}: {shown(uri)} needs a filesystem for {scheme}:// that is not installed: "
            f"pip install {package}"
        ) from None
    except ValueError as exc:
        raise StorageError(
            f"{setting}: no filesystem is known for {scheme}:// in {shown(uri)} ({_first_line(exc)}); "
            "use a local path, s3://, gs://, hf:// or a scheme whose fsspec package is installed"
        ) from None
    return Location(uri.rstrip("/"), path.rstrip("/") or path, PyFileSystem(FSSpecHandler(fs)))


def _join_uri(uri: str, parts: list[str]) -> str:
    if not is_remote(uri):
        return os.path.join(uri, *parts)
    split = urlsplit(uri)
    path = posixpath.join(split.path or "/", *parts) if split.path else "/" + "/".join(parts)
    return urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def _split_glob(spec: str) -> tuple[str, str]:
    """`s3://b/data/*/x*.parquet` -> (`s3://b/data`, `*/x*.parquet`): the longest prefix free of
    glob characters, and the pattern below it."""
    scheme = _SCHEME.match(spec)
    head = scheme.group(0) if scheme else ""
    parts = spec[len(head):].split("/")
    for i, part in enumerate(parts):
        if has_glob(part):
            base = "/".join(parts[:i])
            return head + (base if base or head else "."), "/".join(parts[i:])
    return spec, ""


def _glob_match(rel: str, pattern: str) -> bool:
    """Shell-style match of a relative posix path: `*`, `?` and `[...]` stay within a folder,
    `**` crosses folders (as `glob.glob(recursive=True)`)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.fullmatch("".join(out), rel) is not None


def _visible(rel: str) -> bool:
    """False for a file in a hidden folder or with a hidden name (a leading dot), as shell globs
    and Parquet readers skip them: a writer's temporary files are never read as inputs."""
    return not any(part.startswith(".") for part in rel.split("/"))


def _posix(path: str) -> str:
    return path.replace(os.sep, "/") if os.sep != "/" else path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
