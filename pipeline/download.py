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
keeps the paths) and its checksum. Pooch fetches a missing file through :class:`ResumableDownloader`
and checks its hash before renaming it into place, so a partial or corrupt download never takes a
file's name:

* A file already in ``raw_dir`` is verified, never downloaded again, so ``data.raw_dir`` may point
  at a shared copy: one whose checksum differs is an error (delete it to download it afresh), not
  silently replaced. An archive whose members are all present is not needed at all.
* A transfer streams into ``raw_dir/.<name>.part``. Cut short, it resumes from there with an HTTP
  Range request: at once after a transient error (``ATTEMPTS`` tries, exponential backoff), or in a
  later run.
* A file whose ``known_hash`` is null is used with a warning; ``data.verify=false`` uses every file
  unchecked, with a warning.
* Offline, an HTTP error, a checksum mismatch, a full or unwritable disk: the stage ends with one
  sentence saying what failed and what to do (exit status 2).

On success ``raw_dir/download.json`` lists every file: name, url, hash (the verified known hash; the
sha256 computed here when none is known; null when unchecked), size, and an archive's members. The
MLflow run gets the counts of files downloaded, present and verified, the bytes downloaded and the
rate. File names hold dots, which Hydra's dotted keys cannot address: override one entry as a
mapping, e.g. ``'data.files={g.hdf5:{known_hash:"md5:..."}}'``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import mlflow
import pooch
import requests
from tqdm import tqdm

from .config import Config, DataConfig, RemoteFile, Source
from .stage import PipelineError, atomic_output, stage

ATTEMPTS = 4  # tries per file against transient network errors
FIRST_RETRY_DELAY_S = 1.0  # wait before the second try; doubled before each further one
TIMEOUT_S = 60  # to connect, and between two reads of a response
CHUNK_BYTES = 1 << 20
HASH_ALGORITHMS = {"md5": 32, "sha256": 64}  # algorithm -> length of its hex digest
HEX_DIGITS = set("0123456789abcdef")


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
        for attempt in range(ATTEMPTS):
            try:
                self.transfer(url)
                break
            except requests.RequestException as error:
                if attempt == ATTEMPTS - 1 or not is_transient(error):
                    raise
                time.sleep(FIRST_RETRY_DELAY_S * 2**attempt)
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


def network_failure(error: requests.RequestException, url: str, name: str) -> str:
    """One sentence for a download that failed for good: what happened and what to do."""
    if isinstance(error, requests.HTTPError) and not is_transient(error):
        response = error.response
        return (f"{url} answered HTTP {response.status_code} {response.reason}: check data.base_url "
                f"and the path of {name} in data.files.")
    if not is_transient(error):
        return f"cannot download {url} ({error}): check data.base_url."
    if isinstance(error, requests.HTTPError):
        what = f"HTTP {error.response.status_code} {error.response.reason}"
    elif isinstance(error, requests.Timeout):
        what = f"no answer within {TIMEOUT_S} s"
    elif isinstance(error, requests.ConnectionError):
        what = "cannot connect"
    else:
        what = "the transfer broke off"
    return (f"cannot download {url} ({what}, {ATTEMPTS} tries): check the network connection or set "
            f"data.base_url to a mirror, then run again (a partial download resumes), or copy the files into "
            f"data.raw_dir.")


def check_before_starting(data: DataConfig) -> None:
    """Refuse what cannot work before any transfer or any file: nothing to download, a malformed
    hash, a ``raw_dir`` this process cannot write to."""
    if data.source == Source.pythia:
        raise PipelineError(f"dataset {data.name} is generated, not downloaded: run `python -m pipeline.generate "
                            f"data={data.name}`.")
    if not data.files:
        raise PipelineError(f"dataset {data.name} lists no files to download: add them to data.files.")
    for name, remote in data.files.items():
        algorithm, _, digest = (remote.known_hash or "").partition(":")
        well_formed = len(digest) == HASH_ALGORITHMS.get(algorithm) and set(digest.lower()) <= HEX_DIGITS
        if remote.known_hash is not None and not well_formed:
            raise PipelineError(f"the known_hash of {name} in data.files, {remote.known_hash!r}, is not "
                                f"'md5:<32 hex digits>' or 'sha256:<64 hex digits>': fix it, or make it null.")
    try:
        Path(data.raw_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=data.raw_dir).close()
    except OSError as error:
        raise PipelineError(f"cannot write into data.raw_dir={data.raw_dir} ({error.strerror}): make it "
                            f"writable, or set data.raw_dir to a folder you can write (copy or link the files "
                            f"there).") from None


def extract_members(archive: Path, members: list[str], raw_dir: Path) -> None:
    """Copy the ``members`` of ``archive`` that ``raw_dir`` lacks into it, each under its path in the
    archive; a member appears only once complete."""
    missing = [member for member in members if not (raw_dir / member).exists()]
    if not missing:
        return
    with tarfile.open(archive) as tar:
        for member in missing:
            try:
                source = tar.extractfile(member)
            except KeyError:
                source = None
            if source is None:
                raise PipelineError(f"{archive.name} holds no file {member!r}: list its files with "
                                    f"`tar tf {archive}` and fix the members of {archive.name} in data.files.")
            with source, atomic_output(raw_dir / member, "wb") as target:
                shutil.copyfileobj(source, target, CHUNK_BYTES)


@dataclass
class Obtained:
    """One entry of ``data.files`` after :func:`obtain`."""

    record: dict  # what download.json says of it
    downloaded: bool  # False: it (or, for an archive, every member) was already in raw_dir
    verified: bool  # checked against its known hash
    bytes_received: int = 0
    seconds: float = 0.0


def obtain(registry: pooch.Pooch, name: str, remote: RemoteFile, url: str, raw_dir: Path) -> Obtained:
    """Make sure ``raw_dir/name``, or every member of the archive ``name``, is there and matches its
    checksum (``registry``'s hash; None: unchecked)."""
    path = raw_dir / name
    known_hash = registry.registry[name]
    record = {"name": name, "url": url, "hash": known_hash, "size": None}
    if remote.members:
        record["members"] = list(remote.members)
        if not path.exists() and all((raw_dir / member).exists() for member in remote.members):
            return Obtained({**record, "hash": None}, downloaded=False, verified=False)  # archive not needed
    downloaded = not path.exists()
    downloader = ResumableDownloader(raw_dir / f".{name}.part", name)
    start = time.perf_counter()
    try:
        registry.fetch(name, downloader=downloader)
        seconds = time.perf_counter() - start
        extract_members(path, remote.members, raw_dir)
    except requests.RequestException as error:
        raise PipelineError(network_failure(error, url, name)) from None
    except ValueError:  # pooch: the file does not match known_hash
        if not downloaded:
            raise PipelineError(f"{path} is already there but does not match its known hash {known_hash}: it is "
                                f"damaged or another version; delete it to download it again, or set "
                                f"data.verify=false to use it as it is.") from None
        raise PipelineError(f"the file downloaded from {url} does not match its known hash {known_hash}, so it "
                            f"was deleted: run again in case the transfer was corrupted, and if it fails again "
                            f"check data.base_url and the known_hash of {name} in data.files.") from None
    except OSError as error:
        raise PipelineError(f"cannot write {name} into {raw_dir} ({error.strerror}): free some space or set "
                            f"data.raw_dir to another disk, then run again to resume.") from None
    record["size"] = path.stat().st_size
    if remote.known_hash is None and known_hash is None:
        record["hash"] = f"sha256:{pooch.file_hash(str(path))}"  # to paste into the config
    return Obtained(record, downloaded, verified=known_hash is not None, bytes_received=downloader.bytes_received,
                    seconds=seconds if downloaded else 0.0)


def needed_files(data: DataConfig) -> dict:
    """The entries of ``data.files`` the dataset uses: for JetNet, one file per class, only those of
    ``data.class_names`` (a gluon-only experiment downloads only gluon jets); otherwise all of them."""
    if Source(data.source) != Source.jetnet:
        return dict(data.files)
    wanted = {data.labels.get(name, f"{name}.hdf5") for name in data.class_names}
    return {name: remote for name, remote in data.files.items() if name in wanted}


def download(data: DataConfig, raw_dir: Path) -> tuple[list[dict], dict[str, float]]:
    """Obtain every needed file of ``data.files`` (:func:`needed_files`) in ``raw_dir``; return their
    records and the run's metrics."""
    files = needed_files(data)
    if not data.verify:
        warnings.warn("data.verify=false: the files are used without checking their checksums.", stacklevel=2)
    unknown = [name for name, remote in files.items() if remote.known_hash is None]
    if data.verify and unknown:
        warnings.warn(f"{', '.join(unknown)}: no known_hash in data.files, so not verified; download.json records "
                      f"the sha256.", stacklevel=2)
    urls = {name: f"{data.base_url.rstrip('/')}/{remote.path}" for name, remote in files.items()}
    registry = pooch.create(
        path=raw_dir, base_url=data.base_url, urls=urls,
        registry={name: remote.known_hash if data.verify else None for name, remote in files.items()},
        allow_updates=False,  # a present file that differs is an error, never replaced
    )
    obtained = []
    for name, remote in files.items():
        outcome = obtain(registry, name, remote, urls[name], raw_dir)
        print(f"download: {name}: {'downloaded' if outcome.downloaded else 'present'}, "
              f"{'verified' if outcome.verified else 'not verified'}")
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
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(raw_dir / "download.json"))
        print(f"download: {len(records)} files of {cfg.data.name} in {raw_dir} "
              f"({metrics['files_downloaded']} downloaded, {metrics['bytes_downloaded'] / 1e6:.1f} MB).")


if __name__ == "__main__":
    main()
