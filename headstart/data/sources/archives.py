"""Archive extraction: zip or tar (plain or compressed), recognised by content, extracted atomically
within byte and member budgets; tar members are checked by tarfile's own `data` filter."""

from __future__ import annotations

import lzma
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from headstart.data.sources.candidates import DownloadError
from headstart.files import atomic_directory


def _check_member_path(archive: Path, name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        raise DownloadError(f"{archive}: refusing member {name!r}: its path leaves the extraction folder")
    return path


def archive_format(path: Path) -> str | None:
    """"zip" or "tar" (plain or gzip/bz2/xz compressed) from the file's first bytes; None otherwise."""
    with open(path, "rb") as handle:
        head = handle.read(262)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip with members, an empty zip
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


# what a damaged archive raises while it is read (and OSError without an errno: bad gzip or bz2 data)
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)


def safe_extract(archive: Path, target: Path, max_bytes: int, max_members: int) -> Path:
    """Extract into `target` (built atomically), refusing anything that could escape it or explode."""
    if (target / ".complete").exists():
        return target
    kind = archive_format(archive)
    if kind is None:
        with open(archive, "rb") as handle:
            head = handle.read(32)
        raise DownloadError(
            f"{archive}: not a zip or tar archive (it begins {head!r}); check that the source is the archive "
            "itself and not a web page about it"
        )
    try:
        with atomic_directory(target) as staging:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, staging, max_bytes, max_members)
            (staging / ".complete").touch()
    except _CORRUPT as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk (full, read-only), not the archive
        raise DownloadError(
            f"{archive}: truncated or corrupt {kind} archive ({type(exc).__name__}: {exc}); the file is "
            "damaged: download or copy it again"
        ) from None
    return target


def _budget(archive: Path, written: int, max_bytes: int) -> None:
    if written > max_bytes:
        raise DownloadError(
            f"{archive}: uncompressed size exceeds download.max_archive_bytes={max_bytes}; "
            "raise the limit if the archive is trusted"
        )


@contextmanager
def _member(archive: Path, name: str) -> Iterator[None]:
    """Name the archive and the member when a member's path is both a file and a folder in it."""
    try:
        yield
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise DownloadError(
            f"{archive}: member {name!r} is both a file and a folder in the archive, which is malformed: "
            "rebuild the archive from the image folder"
        ) from None


def _copy_limited(source: Any, dest: Path, archive: Path, written: int, max_bytes: int) -> int:
    with open(dest, "wb") as out:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            written += len(chunk)
            _budget(archive, written, max_bytes)
            out.write(chunk)
    return written


def _extract_zip(archive: Path, staging: Path, max_bytes: int, max_members: int) -> None:
    with zipfile.ZipFile(archive) as bundle:
        members = bundle.infolist()
        if len(members) > max_members:
            raise DownloadError(f"{archive}: {len(members)} members exceed download.max_archive_members={max_members}")
        written = 0
        for member in members:
            relative = _check_member_path(archive, member.filename)
            mode = member.external_attr >> 16
            if mode and (mode & 0o170000) == 0o120000:
                raise DownloadError(f"{archive}: refusing member {member.filename!r}: symbolic link")
            if member.is_dir():
                continue
            dest = staging / relative
            with _member(archive, member.filename), bundle.open(member) as source:
                dest.parent.mkdir(parents=True, exist_ok=True)
                written = _copy_limited(source, dest, archive, written, max_bytes)




def _check_tar_member(archive: Path, member: tarfile.TarInfo, staging: Path) -> PurePosixPath:
    """tarfile's `data` filter refuses escaping paths and links, devices and fifos; ours refuses absolute
    names (the filter strips their slash) and Windows drive letters (POSIX reads them as names)."""
    relative = _check_member_path(archive, member.name)
    try:
        tarfile.data_filter(member, str(staging))
    except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
        raise DownloadError(
            f"{archive}: refusing member {member.name!r}: link to {member.linkname!r} leaves the archive"
        ) from None
    except tarfile.SpecialFileError:
        raise DownloadError(f"{archive}: refusing member {member.name!r}: device or fifo file") from None
    except tarfile.FilterError:
        raise DownloadError(
            f"{archive}: refusing member {member.name!r}: its path leaves the extraction folder"
        ) from None
    return relative


def _extract_tar(archive: Path, staging: Path, max_bytes: int, max_members: int) -> None:
    with tarfile.open(archive) as bundle:
        written, count = 0, 0
        for member in bundle:
            count += 1
            if count > max_members:
                raise DownloadError(f"{archive}: more members than download.max_archive_members={max_members}")
            relative = _check_tar_member(archive, member, staging)
            if not member.isfile():
                continue  # folders are made as needed; links inside the archive are skipped (targets come on their own)
            dest = staging / relative
            source = bundle.extractfile(member)
            if source is not None:
                with _member(archive, member.name):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    written = _copy_limited(source, dest, archive, written, max_bytes)
