"""The download stage against a local HTTP server: it verifies (with the configured hash or the one
the Zenodo record's metadata publishes), resumes, refuses in one clear line, never writes outside
raw_dir, and never leaves a partial file under a real file's name nor touches a file that is already
there."""

import errno
import hashlib
import http.server
import io
import json
import os
import random
import re
import tarfile
import threading

import mlflow
import numpy as np
import pytest

from conftest import compose_config, run_stage
from jet_files import EMPTY_JET, NAN_JET, expected_sets, random_jets, sort_by_jet_pt, write_jetnet, write_root
from pipeline import download
from pipeline.config import RemoteFile
from pipeline.preprocess import preprocess
from pipeline.sets import read_sets
from pipeline.files import PipelineError

JETNET_FILES = ["g.hdf5", "q.hdf5", "t.hdf5", "w.hdf5", "z.hdf5"]  # data=jetnet30
CONTENTS = {name: random.Random(name).randbytes(40_000 + 1_000 * index) for index, name in enumerate(JETNET_FILES)}


JETNET30_RECORD = "/api/records/6975118"  # the metadata of the Zenodo record holding jetnet30's files


def sha256(body: bytes) -> str:
    return f"sha256:{hashlib.sha256(body).hexdigest()}"


def md5(body: bytes) -> str:
    return f"md5:{hashlib.md5(body).hexdigest()}"


def record_metadata(files: dict[str, bytes]) -> bytes:
    """Zenodo's answer to ``GET /api/records/<id>`` for a record holding ``files`` (name -> bytes),
    reduced to what the stage reads: each file's key and checksum (and its size, as Zenodo gives)."""
    entries = [{"key": name, "checksum": md5(body), "size": len(body)} for name, body in files.items()]
    return json.dumps({"id": 6975118, "files": entries}).encode()


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1, honouring ``Range: bytes=<start>-`` with
    206 unless ``ignore_range``; ``cut_after[path] = k`` cuts the next response for ``path`` after k
    bytes, ``fail_next[path] = status`` answers the next request for ``path`` with that error status.
    Every request is recorded as (path, Range header)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.fail_next: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        requested = self.headers.get("Range")
        server.requests.append((self.path, requested))
        body = server.files.get(self.path)
        if body is None or self.path in server.fail_next:
            self.send_error(server.fail_next.pop(self.path, 404))
            return
        resumed = requested is not None and not server.ignore_range
        start = int(requested.removeprefix("bytes=").rstrip("-")) if resumed else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cut = server.cut_after.pop(self.path, None)
        self.wfile.write(body[start:] if cut is None else body[start : start + cut])

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server():
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fast_retries_and_small_chunks(monkeypatch):
    """Retry at once; write every 1000 bytes received (a cut transfer keeps what came in whole chunks)."""
    monkeypatch.setattr(download, "FIRST_RETRY_DELAY_S", 0.01)
    monkeypatch.setattr(download, "CHUNK_BYTES", 1_000)


def url_path(dataset: str, name: str) -> str:
    return "/" + compose_config(f"data={dataset}").data.files[name].path


def hash_overrides(hashes: dict[str, str]) -> str:
    """One override setting several files' known_hash (file names hold dots, so a mapping)."""
    return "data.files={" + ",".join(f"{name}:{{known_hash:'{value}'}}" for name, value in hashes.items()) + "}"


def jetnet(server, raw_dir, *overrides, hashes=True) -> list[str]:
    """Serve CONTENTS at jetnet30's paths; the overrides that download them into ``raw_dir``."""
    server.files.update({url_path("jetnet30", name): body for name, body in CONTENTS.items()})
    known = [hash_overrides({name: sha256(body) for name, body in CONTENTS.items()})] if hashes else []
    return ["data=jetnet30", f"data.base_url={server.url}", f"data.raw_dir={raw_dir}", *known, *overrides]


def run_with_stderr(capsys, *overrides) -> tuple[int, str]:
    """Run the stage in this process (no interpreter start-up); return its exit status and all it
    wrote to stderr."""
    try:
        download.main(compose_config(*overrides))
        status = 0
    except SystemExit as stopped:
        status = stopped.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


def run_in_process(capsys, *overrides) -> tuple[int, str]:
    """:func:`run_with_stderr`, keeping only the last line of stderr."""
    status, err = run_with_stderr(capsys, *overrides)
    return status, (err.strip().splitlines() or [""])[-1]


def last_run_data():
    return mlflow.search_runs(experiment_names=["demo"], output_format="list")[0].data


def last_metrics() -> dict:
    return last_run_data().metrics


def downloaded_names(raw_dir) -> list[str]:
    """The names in ``raw_dir`` (files, partial files), leaving out the stage's own config file."""
    return sorted(path.name for path in raw_dir.iterdir() if path.name != "download.config.yaml")


def recorded_hashes(raw_dir) -> dict[str, tuple[str | None, str | None]]:
    """File name -> (hash, hash_source) as download.json records them."""
    recorded = json.loads((raw_dir / "download.json").read_text())["files"]
    return {entry["name"]: (entry["hash"], entry["hash_source"]) for entry in recorded}


def test_a_run_downloads_verifies_and_records_every_file(tmp_path, server):
    raw = tmp_path / "raw"
    result = run_stage("download", *jetnet(server, raw))
    assert result.returncode == 0, result.stderr
    for name, body in CONTENTS.items():
        assert (raw / name).read_bytes() == body
    recorded = json.loads((raw / "download.json").read_text())["files"]
    assert {entry["name"]: (entry["url"], entry["size"]) for entry in recorded} == {
        name: (server.url + url_path("jetnet30", name), len(body)) for name, body in CONTENTS.items()
    }
    assert recorded_hashes(raw) == {name: (sha256(body), "config") for name, body in CONTENTS.items()}
    left = sorted(path.name for path in raw.iterdir())
    assert left == sorted([*CONTENTS, "download.json", "download.config.yaml"])  # no partial or temporary file
    run = last_run_data()
    assert run.metrics["files_downloaded"] == run.metrics["files_verified"] == len(CONTENTS)
    assert run.metrics["bytes_downloaded"] == sum(map(len, CONTENTS.values()))
    assert run.metrics["download_mb_per_s"] > 0
    assert run.tags["download.verified"] == "true"


def test_a_jetnet_experiment_downloads_only_the_files_of_its_classes(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    status, _ = run_in_process(capsys, *jetnet(server, raw, "data.class_names=[t]"))
    assert status == 0
    assert sorted(path.name for path in raw.glob("*.hdf5")) == ["t.hdf5"]
    assert [path for path, _ in server.requests] == [url_path("jetnet30", "t.hdf5")]


def test_a_cut_transfer_resumes_where_it_stopped(tmp_path, server, capsys):
    overrides = jetnet(server, tmp_path / "raw")
    g = url_path("jetnet30", "g.hdf5")
    server.cut_after[g] = 10_000
    assert run_in_process(capsys, *overrides)[0] == 0
    assert [request for request in server.requests if request[0] == g] == [(g, None), (g, "bytes=10000-")]
    assert (tmp_path / "raw" / "g.hdf5").read_bytes() == CONTENTS["g.hdf5"]
    assert last_metrics()["bytes_downloaded"] == sum(map(len, CONTENTS.values()))  # nothing fetched twice


def test_a_server_error_is_tried_again(tmp_path, server, capsys):
    overrides = jetnet(server, tmp_path / "raw")
    g = url_path("jetnet30", "g.hdf5")
    server.fail_next[g] = 503
    assert run_in_process(capsys, *overrides)[0] == 0
    assert [request for request in server.requests if request[0] == g] == [(g, None), (g, None)]
    assert (tmp_path / "raw" / "g.hdf5").read_bytes() == CONTENTS["g.hdf5"]


@pytest.mark.parametrize("server_resumes", [True, False])
def test_a_partial_file_from_an_earlier_run_is_resumed_or_restarted(tmp_path, server, capsys, server_resumes):
    raw = tmp_path / "raw"
    overrides = jetnet(server, raw)
    server.ignore_range = not server_resumes
    raw.mkdir()
    (raw / ".g.hdf5.part").write_bytes(CONTENTS["g.hdf5"][:5_000])
    assert run_in_process(capsys, *overrides)[0] == 0
    g = url_path("jetnet30", "g.hdf5")
    assert [request for request in server.requests if request[0] == g] == [(g, "bytes=5000-")]
    assert (raw / "g.hdf5").read_bytes() == CONTENTS["g.hdf5"] and not (raw / ".g.hdf5.part").exists()
    skipped = 5_000 if server_resumes else 0
    assert last_metrics()["bytes_downloaded"] == sum(map(len, CONTENTS.values())) - skipped


def test_a_download_that_fails_its_checksum_is_deleted(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    overrides = jetnet(server, raw)
    server.files[url_path("jetnet30", "g.hdf5")] = b"not the published bytes" * 1_000
    status, message = run_in_process(capsys, *overrides)
    assert status == 2
    assert message.startswith("download: error:") and "g.hdf5" in message and "does not match" in message
    assert downloaded_names(raw) == []  # no file, no partial


def test_a_missing_file_names_its_url(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    overrides = jetnet(server, raw)
    q = url_path("jetnet30", "q.hdf5")
    del server.files[q]
    status, message = run_in_process(capsys, *overrides)
    assert status == 2 and message.startswith("download: error:")
    assert f"{server.url}{q} answered HTTP 404" in message
    assert not (raw / "q.hdf5").exists() and not (raw / ".q.hdf5.part").exists()


def test_offline_says_so_after_a_few_tries(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    overrides = jetnet(server, raw)
    server.shutdown()
    server.server_close()  # nothing listens on its port any more
    status, message = run_in_process(capsys, *overrides)
    assert status == 2 and message.startswith("download: error:")
    assert "cannot connect" in message and f"{download.ATTEMPTS} tries" in message
    assert downloaded_names(raw) == []


def test_a_full_disk_says_so_and_keeps_the_partial_file_for_later(tmp_path, server, capsys, monkeypatch):
    def fill_the_disk(self, url):
        self.partial.write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(download.ResumableDownloader, "transfer", fill_the_disk)
    raw = tmp_path / "raw"
    status, message = run_in_process(capsys, *jetnet(server, raw))
    assert status == 2 and message.startswith("download: error: cannot write g.hdf5")
    assert os.strerror(errno.ENOSPC) in message and "free some space" in message
    assert downloaded_names(raw) == [".g.hdf5.part"]


def test_files_already_present_are_verified_without_any_request(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, body in CONTENTS.items():
        (raw / name).write_bytes(body)
    assert run_in_process(capsys, *jetnet(server, raw))[0] == 0
    assert server.requests == []
    assert (raw / "download.json").exists()
    metrics = last_metrics()
    assert metrics["files_present"] == metrics["files_verified"] == len(CONTENTS)
    assert metrics["bytes_downloaded"] == 0


def test_a_present_file_that_differs_is_an_error_and_left_alone(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "g.hdf5").write_bytes(b"someone's other version")
    status, message = run_in_process(capsys, *jetnet(server, raw))
    assert status == 2 and message.startswith("download: error:")
    assert str(raw / "g.hdf5") in message and "delete it" in message and "data.verify=false" in message
    assert (raw / "g.hdf5").read_bytes() == b"someone's other version"
    assert server.requests == []


def test_without_known_hash_files_are_verified_with_the_checksums_their_record_publishes(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    server.files[JETNET30_RECORD] = record_metadata(CONTENTS)
    assert run_in_process(capsys, *jetnet(server, raw, hashes=False))[0] == 0
    assert recorded_hashes(raw) == {name: (md5(body), "record metadata") for name, body in CONTENTS.items()}
    assert [path for path, _ in server.requests].count(JETNET30_RECORD) == 1  # once for the record's five files
    run = last_run_data()
    assert run.metrics["files_verified"] == len(CONTENTS) and run.tags["download.verified"] == "true"


def flip_a_bit(body: bytes) -> bytes:
    return body[:1_000] + bytes([body[1_000] ^ 0x10]) + body[1_001:]


@pytest.mark.parametrize("damage", [flip_a_bit, lambda body: body[:-1]], ids=["a flipped bit", "truncated"])
def test_a_damaged_download_fails_the_checksum_its_record_publishes_and_is_deleted(tmp_path, server, capsys, damage):
    raw = tmp_path / "raw"
    overrides = jetnet(server, raw, hashes=False)
    server.files[JETNET30_RECORD] = record_metadata(CONTENTS)
    g = url_path("jetnet30", "g.hdf5")
    server.files[g] = damage(CONTENTS["g.hdf5"])
    status, message = run_in_process(capsys, *overrides)
    assert status == 2
    assert message.startswith(f"download: error: the file downloaded from {server.url}{g} does not match its "
                              f"checksum {md5(CONTENTS['g.hdf5'])} (from the record metadata), so it was deleted")
    assert not (raw / "g.hdf5").exists() and not (raw / ".g.hdf5.part").exists()


@pytest.mark.parametrize("metadata", ["without g.hdf5", "not served"])
def test_record_metadata_without_the_checksum_stops_before_any_transfer(tmp_path, server, capsys, metadata):
    raw = tmp_path / "raw"
    overrides = jetnet(server, raw, hashes=False)
    if metadata == "without g.hdf5":
        server.files[JETNET30_RECORD] = record_metadata({n: b for n, b in CONTENTS.items() if n != "g.hdf5"})
    status, message = run_in_process(capsys, *overrides)
    assert status == 2 and message.startswith("download: error:") and message.count(". ") == 0
    assert f"{server.url}{JETNET30_RECORD}" in message and "g.hdf5" in message
    assert "known_hash" in message and "data.verify=false" in message
    if metadata == "not served":
        assert "HTTP 404" in message
    assert [path for path, _ in server.requests] == [JETNET30_RECORD]  # no file transferred
    assert not any(path.suffix == ".hdf5" for path in raw.iterdir())


def test_verify_false_uses_files_unchecked_says_so_in_the_log_and_in_mlflow(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    wrong = hash_overrides({name: sha256(b"other bytes") for name in CONTENTS})
    status, err = run_with_stderr(capsys, *jetnet(server, raw, wrong, "data.verify=false", hashes=False))
    assert status == 0
    assert "download: WARNING: data.verify=false: the files are used without checking their checksums" in err
    assert (raw / "g.hdf5").read_bytes() == CONTENTS["g.hdf5"]
    assert JETNET30_RECORD not in [path for path, _ in server.requests]
    assert recorded_hashes(raw) == {name: (None, "unchecked (data.verify=false)") for name in CONTENTS}
    run = last_run_data()
    assert run.metrics["files_verified"] == 0 and run.tags["download.verified"] == "false"


def test_a_file_outside_zenodo_records_without_known_hash_warns_and_records_its_sha256(tmp_path, server, capsys):
    raw = tmp_path / "raw"
    server.files["/mirror/g.hdf5"] = CONTENTS["g.hdf5"]
    overrides = ["data=jetnet30", "data.class_names=[g]", f"data.base_url={server.url}", f"data.raw_dir={raw}",
                 "data.files={g.hdf5:{path:mirror/g.hdf5}}"]
    status, err = run_with_stderr(capsys, *overrides)
    assert status == 0
    assert "download: WARNING: g.hdf5: no known_hash in data.files and not a Zenodo record's file" in err
    assert recorded_hashes(raw) == {"g.hdf5": (sha256(CONTENTS["g.hdf5"]), "computed (unverified)")}
    assert [path for path, _ in server.requests] == ["/mirror/g.hdf5"]  # no record metadata asked for
    run = last_run_data()
    assert run.metrics["files_verified"] == 0 and run.tags["download.verified"] == "false"


@pytest.mark.parametrize("obstacle", ["a file in the way", "a read-only folder"])
def test_an_unwritable_raw_dir_is_refused_before_any_request(tmp_path, server, capsys, obstacle):
    if obstacle == "a file in the way":
        (tmp_path / "file").write_text("")
        raw = tmp_path / "file" / "raw"
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        raw = tmp_path / "read-only"
        raw.mkdir(mode=0o500)
    status, message = run_in_process(capsys, *jetnet(server, raw))
    assert status == 2 and message.startswith(f"download: error: cannot write into data.raw_dir={raw}")
    assert server.requests == []


def test_a_generated_dataset_points_at_the_generate_stage(tmp_path, capsys):
    raw = tmp_path / "raw"
    status, message = run_in_process(capsys, "data=pythia", f"data.raw_dir={raw}")
    assert status == 2 and "python -m pipeline.generate" in message
    assert not raw.exists()


JETCLASS_ARCHIVE = "JetClass_Pythia_val_5M.tar"  # data=jetclass's one archive
JETCLASS_MEMBERS = list(compose_config("data=jetclass").data.files[JETCLASS_ARCHIVE].members)


def tar_archive(files: dict[str, bytes], entries: list[tarfile.TarInfo] = ()) -> bytes:
    """A tar archive of ``files`` (member path -> bytes), then ``entries`` that hold no data (links)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, body in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for entry in entries:
            tar.addfile(entry)
    return buffer.getvalue()


def jetclass(server, raw_dir, archive: bytes, *overrides) -> list[str]:
    """Serve ``archive`` as jetclass's archive; the overrides that download it into ``raw_dir``."""
    server.files[url_path("jetclass", JETCLASS_ARCHIVE)] = archive
    return ["data=jetclass", f"data.base_url={server.url}", f"data.raw_dir={raw_dir}",
            hash_overrides({JETCLASS_ARCHIVE: sha256(archive)}), *overrides]


def test_archive_members_are_extracted_and_a_later_run_needs_no_archive(tmp_path, server, capsys):
    in_archive = [*JETCLASS_MEMBERS, "val_5M/HToBB_120.root"]
    contents = {member: random.Random(member).randbytes(3_000) for member in in_archive}
    raw = tmp_path / "raw"
    overrides = jetclass(server, raw, tar_archive(contents))
    assert run_in_process(capsys, *overrides)[0] == 0
    for member in JETCLASS_MEMBERS:
        assert (raw / member).read_bytes() == contents[member]
    assert not (raw / "val_5M" / "HToBB_120.root").exists()  # not a chosen member
    (raw / JETCLASS_ARCHIVE).unlink()
    server.requests.clear()
    assert run_in_process(capsys, *overrides)[0] == 0
    assert server.requests == []


def test_members_given_as_a_pattern_are_the_regular_files_it_matches_and_preprocess_reads_them(tmp_path, server, capsys):
    """An archive whose file names are not known beforehand (JetClass's training parts): its members
    as a pattern; download.json records the files it matched, a later run needs no archive, and
    preprocessing reads exactly those files."""
    rng = np.random.default_rng(2)
    bodies, jets_per_file = {}, {}
    for member, label in [("val_5M/ZJetsToNuNu_120.root", "label_QCD"), ("val_5M/TTBar_120.root", "label_Tbqq")]:
        jets = [jet for jet in random_jets(rng, 6) if len(jet) and np.isfinite(jet).all()]
        write_root(tmp_path / "file.root", jets, {branch: [branch == label] * len(jets) for branch in ("label_QCD", "label_Tbqq")})
        bodies[member], jets_per_file[member] = (tmp_path / "file.root").read_bytes(), len(jets)
    link = tarfile.TarInfo("val_5M/link.root")  # matches the pattern, but is no regular file: never extracted
    link.type, link.linkname = tarfile.SYMTYPE, "TTBar_120.root"
    archive = tar_archive({**bodies, "val_5M/README.txt": b"not a root file"}, [link])
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    overrides = jetclass(server, raw, archive, f"data.files={{{JETCLASS_ARCHIVE}:{{members:['val_5M/*.root']}}}}",
                         "data.class_names=[qcd,t]", f"data.processed_dir={processed}")
    assert run_in_process(capsys, *overrides)[0] == 0
    [record] = json.loads((raw / "download.json").read_text())["files"]
    assert record["members"] == list(bodies)  # in archive order
    assert not (raw / "val_5M" / "link.root").exists() and not (raw / "val_5M" / "README.txt").exists()
    (raw / JETCLASS_ARCHIVE).unlink()  # removable once extracted
    server.requests.clear()
    assert run_in_process(capsys, *overrides)[0] == 0 and server.requests == []
    counts = preprocess(compose_config(*overrides, "data.n_max=8"), processed, progress=False)[0]
    assert counts["jets_read"] == sum(jets_per_file.values())
    assert [entry["file"] for entry in json.loads(read_sets(processed / "train.h5", datasets=())["source_files"])] == \
        ["ZJetsToNuNu_120.root", "TTBar_120.root"]

    status, message = run_in_process(capsys, *jetclass(server, tmp_path / "other", archive,
                                                       f"data.files={{{JETCLASS_ARCHIVE}:{{members:['train_100M/*.root']}}}}"))
    assert status == 2 and message == (f"download: error: {JETCLASS_ARCHIVE} holds no regular file matching 'train_100M/*.root': "
                                       f"list its files with `tar tf {tmp_path / 'other' / JETCLASS_ARCHIVE}` and fix the "
                                       f"members of {JETCLASS_ARCHIVE} in data.files.")


@pytest.mark.parametrize("where", ["parent folder", "absolute path"])
def test_an_archive_member_outside_raw_dir_is_refused_before_anything_is_written(tmp_path, server, capsys, where):
    raw = tmp_path / "raw"
    outside = tmp_path / "escape.txt"
    member = "../escape.txt" if where == "parent folder" else str(outside)
    overrides = jetclass(server, raw, tar_archive({member: b"written outside raw_dir"}),
                         f"data.files={{{JETCLASS_ARCHIVE}:{{members:['{member}']}}}}")
    status, message = run_in_process(capsys, *overrides)
    assert status == 2
    assert message == (f"download: error: member {member!r} of {JETCLASS_ARCHIVE} in data.files would be written "
                       f"outside data.raw_dir: list each member by its relative path in the archive, without '..' "
                       f"(as `tar tf {JETCLASS_ARCHIVE}` prints it).")
    assert not outside.exists() and not raw.exists() and server.requests == []


def test_extracting_a_member_outside_raw_dir_is_refused(tmp_path):
    """The extraction checks the members itself, for a caller that skipped check_before_starting."""
    archive, raw = tmp_path / "archive.tar", tmp_path / "raw"
    archive.write_bytes(tar_archive({"../escape.txt": b"written outside raw_dir"}))
    raw.mkdir()
    with pytest.raises(PipelineError, match="'../escape.txt' of archive.tar in data.files would be written outside"):
        download.extract_members(archive, ["../escape.txt"], raw)
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("kind", ["symbolic link", "hard link"])
def test_an_archive_member_that_is_a_link_is_refused_before_any_member_is_written(tmp_path, server, capsys, kind):
    """tarfile's extractfile follows a link to the file it names; the stage refuses the link instead."""
    regular = {member: random.Random(member).randbytes(3_000) for member in JETCLASS_MEMBERS[:-1]}
    link_name = JETCLASS_MEMBERS[-1]
    link = tarfile.TarInfo(link_name)
    link.type = tarfile.SYMTYPE if kind == "symbolic link" else tarfile.LNKTYPE
    link.linkname = JETCLASS_MEMBERS[0]
    raw = tmp_path / "raw"
    status, message = run_in_process(capsys, *jetclass(server, raw, tar_archive(regular, [link])))
    assert status == 2
    assert message.startswith(f"download: error: {link_name!r} in {JETCLASS_ARCHIVE} is a {kind}, not a regular "
                              f"file, so it is not extracted: list only regular files")
    assert not any((raw / member).exists() for member in JETCLASS_MEMBERS)


@pytest.mark.parametrize("name", ["../g.hdf5", "/tmp/g.hdf5", "jets/g.hdf5", ".."])
def test_a_file_name_that_leaves_raw_dir_is_refused(tmp_path, name):
    data = compose_config("data=jetnet30", f"data.raw_dir={tmp_path / 'raw'}").data
    data.files = {name: RemoteFile(path="records/6975118/files/g.hdf5")}
    with pytest.raises(PipelineError, match=f"the file name '{re.escape(name)}' in data.files would be written "
                                            f"outside data.raw_dir: name each file by its bare name"):
        download.check_before_starting(data)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("dataset", ["jetnet30", "jetnet150", "jetclass", "jetclass_full", "toptagging", "qg"])
def test_every_public_dataset_config_is_downloadable(tmp_path, dataset):
    data = compose_config(f"data={dataset}", f"data.raw_dir={tmp_path}").data
    download.check_before_starting(data)  # files listed, hashes well formed
    assert set(data.class_names) <= set(data.labels)
    if dataset.startswith("jetnet"):
        assert set(data.labels.values()) == set(data.files)  # a class's label is its file


def test_downloaded_files_preprocess_to_the_expected_sets(tmp_path, server, capsys):
    """Real JetNet-format files served over HTTP, one transfer cut halfway: download, then
    preprocess, and compare the sets value by value with the jets the files were made from."""
    rng = np.random.default_rng(5)
    jets, labels, bodies = [], [], {}
    for index, name in enumerate(JETNET_FILES):
        class_jets = [jet for i, jet in enumerate(random_jets(rng, 8)) if i not in (EMPTY_JET, NAN_JET)]
        write_jetnet(tmp_path / name, class_jets, n_slots=30, rng=rng)
        bodies[name] = (tmp_path / name).read_bytes()
        jets += class_jets
        labels += [index] * len(class_jets)
    server.files.update({url_path("jetnet30", name): body for name, body in bodies.items()})
    server.cut_after[url_path("jetnet30", "t.hdf5")] = len(bodies["t.hdf5"]) // 2
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    overrides = ["data=jetnet30", f"data.base_url={server.url}", f"data.raw_dir={raw}", f"data.processed_dir={processed}",
                 hash_overrides({name: sha256(body) for name, body in bodies.items()})]
    assert run_in_process(capsys, *overrides)[0] == 0
    assert any(path.endswith("t.hdf5") and header for path, header in server.requests)  # resumed with Range
    preprocess(compose_config(*overrides, "data.n_max=8"), processed, progress=False)
    splits = [read_sets(processed / f"{split}.h5") for split in ("train", "val", "test")]
    got = sort_by_jet_pt({name: np.concatenate([sets[name] for sets in splits]) for name in ("particles", "mask", "jets", "labels")})
    expected = expected_sets(jets, labels, 8)
    assert got["labels"].tolist() == expected["labels"].tolist()
    np.testing.assert_array_equal(got["mask"], expected["mask"])
    np.testing.assert_allclose(got["particles"], expected["particles"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(got["jets"], expected["jets"], rtol=1e-4, atol=1e-3)
