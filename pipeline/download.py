"""Download stage: fetch a public jet dataset's raw files into ``data.raw_dir`` and verify them.

``python -m pipeline.download data=<dataset> [data.raw_dir=<folder>] [data.base_url=<mirror>]``

The datasets (``pipeline/conf/data/``), all on Zenodo:

* ``jetnet30``, ``jetnet150``: JetNet, gluon, light-quark, top, W and Z jets of ~1 TeV with up to
  30 or 150 particles, one HDF5 file per class (Kansal et al. 2021, arXiv:2106.11535; records
  6975118 and 6975117);
* ``jetclass``: JetClass, ROOT files of 10 classes (Qu, Li, Qian 2022, arXiv:2202.03772; record
  6619768), packed in tar archives of ~190 GB in all: an archive's ``members`` are the ROOT files
  extracted from it, into ``raw_dir`` under their paths in the archive (``val_5M/TTBar_120.root``);
* ``toptagging``: the top-quark tagging reference dataset, pandas HDF5 train/val/test (Kasieczka,
  Plehn et al. 2019, arXiv:1902.09914; record 2603256);
* ``qg``: energyflow's Pythia quark and gluon jets, npz (Komiske, Metodiev, Thaler 2019,
  arXiv:1810.05165; record 3164691).

``data.files`` maps each file name in ``raw_dir`` to its path under ``data.base_url`` (a mirror
keeps the paths) and its checksum. A file is checked against a published checksum (but see below): its
``known_hash`` in ``data.files`` or, where that is null, the checksum Zenodo publishes for it in the
record's metadata (``{data.base_url}/api/records/<id>``, fetched once per record before any
transfer; the jetnet30, jetnet150 and toptagging presets rely on it). Pooch fetches a missing file
through :class:`ResumableDownloader` and checks it before renaming it into place, so a partial or
corrupt download never takes a file's name:

* A file already in ``raw_dir`` is verified, never downloaded again, so ``data.raw_dir`` may point
  at a shared copy: one whose checksum differs is an error (delete it to download it afresh), not
  silently replaced. (Without a known_hash, that still asks the record metadata: offline, set the
  known_hash.) An archive whose members are all present is not needed at all.
* A transfer streams into ``raw_dir/.<name>.part``. Cut short, it resumes from there with an HTTP
  Range request: at once after a transient error (``ATTEMPTS`` tries, exponential backoff), or in a
  later run.
* A file name in ``data.files`` is a bare name, and an archive's members are relative paths without
  ``..``; an archive entry that is a link or not a regular file is not extracted. Nothing is ever
  written outside ``raw_dir``.
* ``data.verify=false`` uses every file unchecked (for a mirror without Zenodo's record metadata). A
  file with a null ``known_hash`` whose path is not a Zenodo record's (``records/<id>/files/<name>``)
  is unchecked too: nothing publishes its checksum, so its sha256 is only computed and recorded. Either
  way the stage log says so in a WARNING line and the MLflow run gets the tag
  ``download.verified=false``.
* Offline, an HTTP error, a file the record metadata does not list, a checksum mismatch, a full or
  unwritable disk: the stage ends with one sentence saying what failed and what to do (exit status 2).

On success ``raw_dir/download.json`` lists every file: name, url, hash, hash_source (where the hash
comes from: ``config``, ``record metadata``, ``computed (unverified)`` for the sha256 computed here,
``unchecked (data.verify=false)`` with a null hash; null for an archive not needed), size, and an
archive's members. The MLflow run gets the counts of files downloaded, present and verified, the bytes
downloaded and the rate, and the tag ``download.verified`` (``true`` when every file used was
verified). File names hold dots, which Hydra's dotted keys cannot address: override one entry as a
mapping, e.g. ``'data.files={g.hdf5:{known_hash:"md5:..."}}'``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import hydra
import mlflow
import pooch
import requests
from tqdm import tqdm

from .config import Config, DataConfig, RemoteFile, Source, jetnet_file_name
from .files import PipelineError, atomic_output
from .stage import stage
from .tracking import WRITTEN, FileDataset, log_files

ATTEMPTS = 4  # tries per request against transient network errors
FIRST_RETRY_DELAY_S = 1.0  # wait before the second try; doubled before each further one
TIMEOUT_S = 60  # to connect, and between two reads of a response
CHUNK_BYTES = 1 << 20
HASH_ALGORITHMS = {"md5": 32, "sha256": 64}  # algorithm -> length of its hex digest
HEX_DIGITS = set("0123456789abcdef")
ZENODO_FILE_PATH = re.compile(r"records/(?P<record_id>\d+)/files/(?P<key>[^/?]+)(\?.*)?")  # a Zenodo record's file
VERIFIED_TAG = "download.verified"  # MLflow tag: "true" when every file used was checked against a checksum

# Where the hash in download.json comes from (its "hash_source").
FROM_CONFIG = "config"  # the file's known_hash in data.files
FROM_RECORD = "record metadata"  # the checksum Zenodo publishes in the record's metadata
COMPUTED = "computed (unverified)"  # the sha256 computed here: nothing published to check against
UNCHECKED = "unchecked (data.verify=false)"  # no hash

Result = TypeVar("Result")


class IncompleteTransfer(requests.RequestException):
    """The body ended before its announced length, or the server cannot resume the partial file."""


def is_transient(error: requests.RequestException) -> bool:
    """Worth another try: no connection, a timeout, a transfer cut short, or a server error (5xx)."""
    if isinstance(error, requests.HTTPError):
        return error.response.status_code >= 500
    return isinstance(
        error,
        (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, IncompleteTransfer),
    )


def with_retries(request: Callable[[], Result]) -> Result:
    """``request()``, tried again after a transient error (:func:`is_transient`), up to ``ATTEMPTS``
    tries with exponential backoff; the last error propagates."""
    for attempt in range(ATTEMPTS - 1):
        try:
            return request()
        except requests.RequestException as error:
            if not is_transient(error):
                raise
            time.sleep(FIRST_RETRY_DELAY_S * 2**attempt)
    return request()


class ResumableDownloader:
    """A pooch downloader, ``(url, output_file, pooch, check_only=False)``, that resumes.

    It streams ``url`` into ``partial``, which outlives the process. When ``partial`` exists it asks
    only for the missing bytes (``Range: bytes=<size>-``) and appends them on 206 Partial Content, or
    starts over on 200. Transient errors are retried with exponential backoff. Only the complete
    bytes are moved into pooch's ``output_file``; pooch then checks the hash and renames the file
    into place, or deletes it.
    """

    def __init__(self, partial: Path, label: str):
        self.partial = partial
        self.label = label  # the progress bar's
        self.bytes_received = 0

    def __call__(self, url: str, output_file: str, pooch_: pooch.Pooch, check_only: bool = False) -> bool | None:
        if check_only:
            with requests.head(url, allow_redirects=True, timeout=TIMEOUT_S) as response:
                return response.ok
        with_retries(lambda: self.transfer(url))
        os.replace(self.partial, output_file)
        return None

    def transfer(self, url: str) -> None:
        """One try: fetch the bytes ``partial`` lacks and write them to it."""
        offset = self.partial.stat().st_size if self.partial.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # the bytes as stored, so offsets and sizes agree
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            if response.status_code == 416:  # Range Not Satisfiable: partial is no prefix of the file
                self.partial.unlink()
                raise IncompleteTransfer(f"{url} cannot resume at byte {offset}")
            response.raise_for_status()
            start = offset if response.status_code == 206 else 0
            length = response.headers.get("Content-Length")
            expected_size = start + int(length) if length is not None else None
            with (
                open(self.partial, "ab" if start else "wb") as file,
                tqdm(total=expected_size, initial=start, desc=self.label, unit="B", unit_scale=True,
                     unit_divisor=1024, disable=None) as progress,
            ):
                for chunk in response.iter_content(CHUNK_BYTES):
                    file.write(chunk)
                    progress.update(len(chunk))
                    self.bytes_received += len(chunk)
        size = self.partial.stat().st_size
        if expected_size is not None and size != expected_size:
            raise IncompleteTransfer(f"{url} ended after {size} of {expected_size} bytes")


def what_failed(error: requests.RequestException) -> str:
    """A few words for a failed request: ``HTTP 503 Service Unavailable``, ``cannot connect``..."""
    if isinstance(error, requests.HTTPError):
        return f"HTTP {error.response.status_code} {error.response.reason}"
    if isinstance(error, requests.Timeout):
        return f"no answer within {TIMEOUT_S} s"
    if isinstance(error, requests.ConnectionError):
        return "cannot connect"
    if isinstance(error, (requests.exceptions.ChunkedEncodingError, IncompleteTransfer)):
        return "the transfer broke off"
    if isinstance(error, requests.JSONDecodeError):
        return "the answer is not JSON"
    return str(error)


def network_failure(error: requests.RequestException, url: str, name: str) -> str:
    """One sentence for a download that failed for good: what happened and what to do."""
    if isinstance(error, requests.HTTPError) and not is_transient(error):
        response = error.response
        return (f"{url} answered HTTP {response.status_code} {response.reason}: check data.base_url "
                f"and the path of {name} in data.files.")
    if not is_transient(error):
        return f"cannot download {url} ({error}): check data.base_url."
    return (f"cannot download {url} ({what_failed(error)}, {ATTEMPTS} tries): check the network connection or "
            f"set data.base_url to a mirror, then run again (a partial download resumes), or copy the files into "
            f"data.raw_dir.")


def is_checksum(value: object) -> bool:
    """Whether ``value`` is ``"md5:<32 hex digits>"`` or ``"sha256:<64 hex digits>"``."""
    if not isinstance(value, str):
        return False
    algorithm, _, digest = value.partition(":")
    return len(digest) == HASH_ALGORITHMS.get(algorithm) and set(digest.lower()) <= HEX_DIGITS


def is_bare_file_name(name: str) -> bool:
    """Whether ``name`` names a file directly in a folder: no ``/``, not ``.`` or ``..``."""
    return name not in ("", ".", "..") and "/" not in name


def stays_inside(member: str) -> bool:
    """Whether the archive member path ``member`` lands inside the folder it is extracted into:
    relative, with no ``..`` part (checked on the text, before any file exists)."""
    path = PurePosixPath(member)
    return not path.is_absolute() and ".." not in path.parts and path.parts != ()


def check_members(archive_name: str, members: list[str]) -> None:
    """Refuse a member of ``archive_name`` that would be written outside ``raw_dir``."""
    for member in members:
        if not stays_inside(member):
            raise PipelineError(f"member {member!r} of {archive_name} in data.files would be written outside "
                                f"data.raw_dir: list each member by its relative path in the archive, without "
                                f"'..' (as `tar tf {archive_name}` prints it).")


def check_before_starting(data: DataConfig) -> None:
    """Refuse what cannot work before any transfer or any file: nothing to download, a file name or
    an archive member that would land outside ``raw_dir``, a malformed hash, a ``raw_dir`` this
    process cannot write to."""
    if data.source == Source.pythia:
        raise PipelineError(f"dataset {data.name} is generated, not downloaded: run `python -m pipeline.generate "
                            f"data={data.name}`.")
    if not data.files:
        raise PipelineError(f"dataset {data.name} lists no files to download: add them to data.files.")
    for name, remote in data.files.items():
        if not is_bare_file_name(name):
            raise PipelineError(f"the file name {name!r} in data.files would be written outside data.raw_dir: name "
                                f"each file by its bare name, without '/' (e.g. {PurePosixPath(remote.path).name!r}).")
        if remote.known_hash is not None and not is_checksum(remote.known_hash):
            raise PipelineError(f"the known_hash of {name} in data.files, {remote.known_hash!r}, is not "
                                f"'md5:<32 hex digits>' or 'sha256:<64 hex digits>': fix it, or make it null.")
        check_members(name, remote.members)
    try:
        Path(data.raw_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=data.raw_dir).close()
    except OSError as error:
        raise PipelineError(f"cannot write into data.raw_dir={data.raw_dir} ({error.strerror}): make it "
                            f"writable, or set data.raw_dir to a folder you can write (copy or link the files "
                            f"there).") from None


def entry_kind(entry: tarfile.TarInfo) -> str:
    """What a non-regular archive entry is, in words."""
    if entry.issym():
        return "symbolic link"
    if entry.islnk():
        return "hard link"
    if entry.isdir():
        return "directory"
    return "special file"


def is_pattern(member: str) -> bool:
    """Whether an archive member is given as a shell-style pattern (``train_100M/*.root``)."""
    return any(character in member for character in "*?[")


def extract_members(archive: Path, members: list[str], raw_dir: Path) -> list[str]:
    """Copy the ``members`` of ``archive`` that ``raw_dir`` lacks into it, each under its path in the
    archive; a member appears only once complete; returns the members, patterns replaced by the
    regular files they match (in archive order). Every member is checked before any is written: it
    must stay inside ``raw_dir`` and be a regular file of the archive (a link is refused, never
    followed); a pattern must match at least one regular file."""
    check_members(archive.name, members)
    patterns = [member for member in members if is_pattern(member)]
    if not patterns and all((raw_dir / member).exists() for member in members):
        return list(members)
    with tarfile.open(archive) as tar:
        regular = [entry for entry in tar.getmembers() if entry.isfile()] if patterns else []
        matched, expanded = {}, []  # matched: the archive entries of the patterns' files, by name
        for member in members:
            if not is_pattern(member):
                expanded.append(member)
                continue
            hits = [entry for entry in regular if fnmatch.fnmatchcase(entry.name, member)]
            if not hits:
                raise PipelineError(f"{archive.name} holds no regular file matching {member!r}: list its files with "
                                    f"`tar tf {archive}` and fix the members of {archive.name} in data.files.")
            check_members(archive.name, [entry.name for entry in hits])
            matched.update((entry.name, entry) for entry in hits)
            expanded += [entry.name for entry in hits]
        expanded = list(dict.fromkeys(expanded))
        missing = [member for member in expanded if not (raw_dir / member).exists()]
        entries = {member: matched[member] for member in missing if member in matched}
        for member in (member for member in missing if member not in matched):
            try:
                entries[member] = tar.getmember(member)
            except KeyError:
                raise PipelineError(f"{archive.name} holds no file {member!r}: list its files with "
                                    f"`tar tf {archive}` and fix the members of {archive.name} in "
                                    f"data.files.") from None
            if not entries[member].isfile():
                raise PipelineError(f"{member!r} in {archive.name} is a {entry_kind(entries[member])}, not a "
                                    f"regular file, so it is not extracted: list only regular files among the "
                                    f"members of {archive.name} in data.files (`tar tvf {archive}` shows each "
                                    f"entry's type).")
        for member, entry in entries.items():
            with tar.extractfile(entry) as source, atomic_output(raw_dir / member, "wb") as target:
                shutil.copyfileobj(source, target, CHUNK_BYTES)
    return expanded


@dataclass(frozen=True)
class Checksum:
    """What a file is checked against, and where that comes from."""

    value: str | None  # "md5:<hex>" or "sha256:<hex>"; None: nothing to check against
    source: str  # FROM_CONFIG, FROM_RECORD, COMPUTED or UNCHECKED


def record_checksums(url: str, name: str) -> dict[str, str]:
    """The checksums a Zenodo record publishes for its files, file key -> checksum, from its metadata
    at ``url`` (``{base_url}/api/records/<id>``); ``name``, a file that needs them, is for the error
    message."""

    def fetch_metadata():
        with requests.get(url, headers={"Accept": "application/json"}, timeout=TIMEOUT_S) as response:
            response.raise_for_status()
            return response.json()

    try:
        metadata = with_retries(fetch_metadata)
    except requests.RequestException as error:
        raise PipelineError(f"cannot fetch the checksum of {name} from the record metadata at {url} "
                            f"({what_failed(error)}): run again if the network was at fault, or set the known_hash "
                            f"of {name} in data.files, or set data.verify=false to use the files unchecked (a "
                            f"mirror without Zenodo's record metadata).") from None
    files = metadata.get("files") if isinstance(metadata, dict) else None
    if not isinstance(files, list):
        return {}
    return {entry.get("key"): entry.get("checksum") for entry in files if isinstance(entry, dict)}


def checksums_to_verify(data: DataConfig, files: dict[str, RemoteFile]) -> dict[str, Checksum]:
    """What each of ``files`` is checked against: its known_hash, else the checksum its Zenodo
    record publishes (metadata fetched once per record); nothing under ``data.verify=false`` or for
    a path outside Zenodo's records. A record file that its metadata does not list is an error."""
    published: dict[str, dict[str, str]] = {}  # record metadata URL -> its files' checksums
    checksums = {}
    for name, remote in files.items():
        if not data.verify:
            checksums[name] = Checksum(None, UNCHECKED)
        elif remote.known_hash is not None:
            checksums[name] = Checksum(remote.known_hash, FROM_CONFIG)
        elif (zenodo_file := ZENODO_FILE_PATH.fullmatch(remote.path)) is None:
            checksums[name] = Checksum(None, COMPUTED)
        else:
            url = f"{data.base_url.rstrip('/')}/api/records/{zenodo_file['record_id']}"
            if url not in published:
                published[url] = record_checksums(url, name)
            checksum = published[url].get(zenodo_file["key"])
            if not is_checksum(checksum):
                raise PipelineError(f"the record metadata at {url} lists no md5 or sha256 checksum for "
                                    f"{zenodo_file['key']}: check the path of {name} in data.files, or set its "
                                    f"known_hash there, or set data.verify=false to use the files unchecked.")
            checksums[name] = Checksum(checksum, FROM_RECORD)
    return checksums


@dataclass
class Obtained:
    """One entry of ``data.files`` after :func:`obtain`."""

    record: dict  # what download.json says of it
    downloaded: bool  # False: it (or, for an archive, every member) was already in raw_dir
    verified: bool  # checked against a published checksum (config or record metadata)
    bytes_received: int = 0
    seconds: float = 0.0


def extracted_members(raw_dir: Path) -> dict[str, list[str]]:
    """The members each archive had extracted by the last run into ``raw_dir`` (its ``download.json``),
    patterns replaced by the files they matched; empty before any run."""
    record = raw_dir / "download.json"
    if not record.is_file():
        return {}
    return {entry["name"]: entry["members"] for entry in json.loads(record.read_text())["files"] if entry.get("members")}


def archive_members(raw_dir: Path, name: str, remote: RemoteFile) -> list[str] | None:
    """The members of the archive ``name`` as files in ``raw_dir``: as listed, or, where the list has
    patterns, as the last run extracted them (None: not known until the archive is read)."""
    if not any(is_pattern(member) for member in remote.members):
        return list(remote.members)
    return extracted_members(raw_dir).get(name)


def archive_not_needed(raw_dir: Path, name: str, remote: RemoteFile) -> bool:
    """Whether ``name`` is an archive absent from ``raw_dir`` whose members all are there."""
    members = archive_members(raw_dir, name, remote) if remote.members else None
    return bool(members) and not (raw_dir / name).exists() and all((raw_dir / member).exists() for member in members)


def obtain(registry: pooch.Pooch, name: str, remote: RemoteFile, url: str, raw_dir: Path,
           checksum: Checksum) -> Obtained:
    """Make sure ``raw_dir/name``, and every member of the archive ``name``, is there and matches
    ``checksum``, which ``registry`` holds as the hash of ``name``."""
    path = raw_dir / name
    record = {"name": name, "url": url, "hash": checksum.value, "hash_source": checksum.source, "size": None}
    if remote.members:
        record["members"] = list(remote.members)
    downloaded = not path.exists()
    downloader = ResumableDownloader(raw_dir / f".{name}.part", name)
    start = time.perf_counter()
    try:
        registry.fetch(name, downloader=downloader)
        seconds = time.perf_counter() - start
        if remote.members:
            record["members"] = extract_members(path, remote.members, raw_dir)
    except requests.RequestException as error:
        raise PipelineError(network_failure(error, url, name)) from None
    except ValueError:  # pooch: the file does not match the checksum
        where = f"its checksum {checksum.value} (from the {checksum.source})"
        if not downloaded:
            raise PipelineError(f"{path} is already there but does not match {where}: it is damaged or another "
                                f"version; delete it to download it again, or set data.verify=false to use it as "
                                f"it is.") from None
        raise PipelineError(f"the file downloaded from {url} does not match {where}, so it was deleted: run again "
                            f"in case the transfer was corrupted, and if it fails again check data.base_url and "
                            f"the path and known_hash of {name} in data.files.") from None
    except OSError as error:
        raise PipelineError(f"cannot write {name} into {raw_dir} ({error.strerror}): free some space or set "
                            f"data.raw_dir to another disk, then run again to resume.") from None
    record["size"] = path.stat().st_size
    if checksum.source == COMPUTED:
        record["hash"] = f"sha256:{pooch.file_hash(str(path))}"  # to paste into the config
    return Obtained(record, downloaded, verified=checksum.value is not None, bytes_received=downloader.bytes_received,
                    seconds=seconds if downloaded else 0.0)


def needed_files(data: DataConfig) -> dict:
    """The entries of ``data.files`` the dataset uses: for JetNet, one file per class, only those of
    ``data.class_names`` (a gluon-only experiment downloads only gluon jets); otherwise all of them."""
    if Source(data.source) != Source.jetnet:
        return dict(data.files)
    wanted = {jetnet_file_name(data.labels, name) for name in data.class_names}
    return {name: remote for name, remote in data.files.items() if name in wanted}


def warn(message: str) -> None:
    """A WARNING line in the stage's log (stderr), where a user reading the log cannot miss it."""
    print(f"download: WARNING: {message}", file=sys.stderr)


def download(data: DataConfig, raw_dir: Path) -> tuple[list[dict], dict[str, float]]:
    """Obtain every needed file of ``data.files`` (:func:`needed_files`) in ``raw_dir``, each checked
    against the checksum :func:`checksums_to_verify` finds for it (all found before any transfer);
    return their records and the run's metrics."""
    files = needed_files(data)
    to_obtain = {name: remote for name, remote in files.items() if not archive_not_needed(raw_dir, name, remote)}
    checksums = checksums_to_verify(data, to_obtain)
    if not data.verify:
        warn("data.verify=false: the files are used without checking their checksums, so a corrupt or "
             "truncated file goes unnoticed.")
    unpublished = [name for name, checksum in checksums.items() if checksum.source == COMPUTED]
    if unpublished:
        warn(f"{', '.join(unpublished)}: no known_hash in data.files and not a Zenodo record's file, so not "
             f"verified; download.json records the sha256 to set as known_hash.")
    urls = {name: f"{data.base_url.rstrip('/')}/{remote.path}" for name, remote in files.items()}
    registry = pooch.create(
        path=raw_dir, base_url=data.base_url, urls=urls,
        registry={name: checksum.value for name, checksum in checksums.items()},
        allow_updates=False,  # a present file that differs is an error, never replaced
    )
    obtained = []
    for name, remote in files.items():
        if name in checksums:
            outcome = obtain(registry, name, remote, urls[name], raw_dir, checksums[name])
            verified = f"verified against the {checksums[name].source}" if outcome.verified else "not verified"
            print(f"download: {name}: {'downloaded' if outcome.downloaded else 'present'}, {verified}")
        else:
            record = {"name": name, "url": urls[name], "hash": None, "hash_source": None, "size": None,
                      "members": archive_members(raw_dir, name, remote)}
            outcome = Obtained(record, downloaded=False, verified=False)
            print(f"download: {name}: not needed, its members are present")
        obtained.append(outcome)
    received = sum(outcome.bytes_received for outcome in obtained)
    metrics = {
        "files_downloaded": sum(outcome.downloaded for outcome in obtained),
        "files_present": sum(not outcome.downloaded for outcome in obtained),
        "files_verified": sum(outcome.verified for outcome in obtained),
        "bytes_downloaded": received,
    }
    if received:
        metrics["download_seconds"] = sum(outcome.seconds for outcome in obtained)
        metrics["download_mb_per_s"] = received / 1e6 / metrics["download_seconds"]
    return [outcome.record for outcome in obtained], metrics


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: Config) -> None:
    try:  # before the stage writes its config into raw_dir, so a refused request leaves nothing
        check_before_starting(cfg.data)
    except PipelineError as error:
        print(f"download: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    with stage("download", cfg, output_dir=cfg.data.raw_dir, config_file="download.config.yaml") as raw_dir:
        records, metrics = download(cfg.data, raw_dir)
        with atomic_output(raw_dir / "download.json") as file:
            json.dump({"dataset": cfg.data.name, "files": records}, file, indent=2)
        unverified = [record["name"] for record in records if record["hash_source"] in (COMPUTED, UNCHECKED)]
        mlflow.set_tag(VERIFIED_TAG, "false" if unverified else "true")
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(raw_dir / "download.json"))
        log_files(WRITTEN, [FileDataset(raw_dir / record["name"], known_hash=record["hash"]) for record in records
                            if (raw_dir / record["name"]).is_file()])  # not an archive removed after extraction
        print(f"download: {len(records)} files of {cfg.data.name} in {raw_dir} "
              f"({metrics['files_downloaded']} downloaded, {metrics['bytes_downloaded'] / 1e6:.1f} MB).")


if __name__ == "__main__":
    main()
