"""segtrain.download against a loopback HTTP server that speaks Range requests."""
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from segtrain import download as dl
from segtrain.voc import label_to_png_bytes


@pytest.fixture
def server(monkeypatch):
    """Serves ``state.files`` (URL path -> bytes) on 127.0.0.1 and records every request.

    ``honour_range=False`` makes it ignore Range (always 200 + the whole body);
    ``cut_at=N`` makes the next response stop after N body bytes and close;
    ``redirects`` (path -> path) answers 301, as host.robots.ox.ac.uk does.
    """
    # A proxy from the environment must not see loopback requests.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    state = SimpleNamespace(files={}, requests=[], redirects={}, honour_range=True, cut_at=None)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            range_header = self.headers.get("Range")
            state.requests.append({"path": self.path, "range": range_header})
            if self.path in state.redirects:
                self.send_response(301)
                self.send_header("Location", state.url(state.redirects[self.path]))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if range_header and state.honour_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            if state.cut_at is not None:  # promise everything, deliver a prefix, hang up
                payload, state.cut_at = payload[:state.cut_at], None
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_bytes(members: dict) -> bytes:
    """name -> bytes (a file) or ("symlink", target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def zip_bytes(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buf.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def voc_tree() -> dict:
    """A tiny VOCdevkit/VOC2012 tree, as the official tar lays it out."""
    base = "VOCdevkit/VOC2012"
    label = np.zeros((40, 48), dtype=np.uint8)
    label[10:30, 5:20], label[0] = 15, 255
    files = {f"{base}/ImageSets/Segmentation/train.txt": b"2007_000032\n2007_000039\n",
             f"{base}/ImageSets/Segmentation/val.txt": b"2007_000039\n"}
    for i, sid in enumerate(["2007_000032", "2007_000039"]):
        files[f"{base}/JPEGImages/{sid}.jpg"] = jpeg_bytes(i)
        files[f"{base}/SegmentationClass/{sid}.png"] = label_to_png_bytes(label)
    # Big enough that the ~64 KiB padding of a tar is not the whole file.
    files[f"{base}/Annotations/padding.bin"] = np.random.default_rng(0).bytes(300_000)
    return files


@pytest.fixture(scope="module")
def voc_tar(voc_tree) -> bytes:
    return tar_bytes(voc_tree)


def use_voc_tar(monkeypatch, server, data: bytes, md5_hex: str) -> str:
    server.files["/voc.tar"] = data
    url = server.url("/voc.tar")
    monkeypatch.setattr(dl, "VOC_TRAINVAL", dl.Remote(dl.VOC_TRAINVAL.filename, (url,), md5_hex, len(data)))
    return url


def test_download_voc_verifies_extracts_and_then_skips(tmp_path, server, monkeypatch, voc_tree, voc_tar):
    use_voc_tar(monkeypatch, server, voc_tar, md5(voc_tar))
    root = tmp_path / "data"
    voc_root = dl.download_voc(root, progress=False)

    assert voc_root == root / "VOCdevkit" / "VOC2012"
    assert (root / dl.VOC_TRAINVAL.filename).read_bytes() == voc_tar
    assert not (root / f"{dl.VOC_TRAINVAL.filename}.part").exists()
    for name, content in voc_tree.items():
        assert (root / name).read_bytes() == content, name
    assert len(server.requests) == 1 and server.requests[0]["range"] is None

    # A second run finds the verified tar and the extraction marker: no request, no re-extraction.
    sentinel = voc_root / "ImageSets" / "Segmentation" / "train.txt"
    sentinel.write_bytes(b"edited\n")
    assert dl.download_voc(root, progress=False) == voc_root
    assert len(server.requests) == 1
    assert sentinel.read_bytes() == b"edited\n"


def test_resume_sends_range_and_appends(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    dest = tmp_path / "voc.tar"
    half = len(voc_tar) // 2
    (tmp_path / "voc.tar.part").write_bytes(voc_tar[:half])

    dl.download(server.url("/voc.tar"), dest, md5(voc_tar), progress=False)

    assert server.requests[-1]["range"] == f"bytes={half}-"
    assert dest.read_bytes() == voc_tar
    assert not (tmp_path / "voc.tar.part").exists()


def test_resume_survives_a_redirect(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    server.redirects["/old/voc.tar"] = "/voc.tar"
    (tmp_path / "voc.tar.part").write_bytes(voc_tar[:5000])

    dl.download(server.url("/old/voc.tar"), tmp_path / "voc.tar", md5(voc_tar), progress=False)

    assert server.requests == [{"path": "/old/voc.tar", "range": "bytes=5000-"},
                               {"path": "/voc.tar", "range": "bytes=5000-"}]
    assert (tmp_path / "voc.tar").read_bytes() == voc_tar


def test_server_ignoring_range_restarts_from_scratch(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    server.honour_range = False
    dest = tmp_path / "voc.tar"
    # A wrong prefix: appending the full 200 body to it would give a corrupt file.
    (tmp_path / "voc.tar.part").write_bytes(b"x" * 1000)

    dl.download(server.url("/voc.tar"), dest, md5(voc_tar), progress=False)

    assert server.requests[-1]["range"] == "bytes=1000-"
    assert dest.read_bytes() == voc_tar


def test_interrupted_transfer_keeps_part_and_next_run_resumes(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    server.cut_at = 100_000
    dest = tmp_path / "voc.tar"
    with pytest.raises(dl.DownloadError, match="run again to resume"):
        dl.download(server.url("/voc.tar"), dest, md5(voc_tar), progress=False)
    assert not dest.exists()
    assert (tmp_path / "voc.tar.part").stat().st_size == 100_000

    dl.download(server.url("/voc.tar"), dest, md5(voc_tar), progress=False)
    assert server.requests[-1]["range"] == "bytes=100000-"
    assert dest.read_bytes() == voc_tar


def test_complete_part_gets_416_and_is_published(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    (tmp_path / "voc.tar.part").write_bytes(voc_tar)
    dest = dl.download(server.url("/voc.tar"), tmp_path / "voc.tar", md5(voc_tar), progress=False)
    assert server.requests[-1]["range"] == f"bytes={len(voc_tar)}-"
    assert dest.read_bytes() == voc_tar


def test_md5_mismatch_names_file_and_hashes_and_leaves_no_final_file(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    dest = tmp_path / "voc.tar"
    wrong = "0" * 32
    with pytest.raises(dl.ChecksumError) as err:
        dl.download(server.url("/voc.tar"), dest, wrong, progress=False)
    message = str(err.value)
    assert "MD5 mismatch" in message and str(dest) in message
    assert wrong in message and md5(voc_tar) in message
    assert not dest.exists() and not (tmp_path / "voc.tar.part").exists()
    assert (tmp_path / "voc.tar.bad").read_bytes() == voc_tar  # kept for inspection, never resumed from


def test_corrupt_existing_file_is_set_aside_and_downloaded_again(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    dest = tmp_path / "voc.tar"
    dest.write_bytes(b"truncated")
    dl.download(server.url("/voc.tar"), dest, md5(voc_tar), progress=False)
    assert dest.read_bytes() == voc_tar
    assert (tmp_path / "voc.tar.bad").read_bytes() == b"truncated"


def test_mirror_fallback_and_all_mirrors_failing(tmp_path, server, voc_tar):
    server.files["/voc.tar"] = voc_tar
    remote = dl.Remote("voc.tar", (server.url("/gone.tar"), server.url("/voc.tar")), md5(voc_tar))
    assert dl.fetch(remote, tmp_path, progress=False).read_bytes() == voc_tar
    assert [r["path"] for r in server.requests] == ["/gone.tar", "/voc.tar"]

    with pytest.raises(dl.DownloadError, match=r"every URL failed.*HTTP 404"):
        dl.fetch(remote, tmp_path / "other", urls=[server.url("/gone.tar")], progress=False)


def test_cli_reports_checksum_failure_in_one_line(tmp_path, server, monkeypatch, voc_tar, capsys):
    url = use_voc_tar(monkeypatch, server, voc_tar, "f" * 32)
    with pytest.raises(SystemExit) as exit_info:
        dl.main(["--root", str(tmp_path), "--url", url])
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert error_line.startswith("segtrain: error: ") and "MD5 mismatch" in error_line
    assert not (tmp_path / dl.VOC_TRAINVAL.filename).exists()


def test_tools_wrapper_runs_from_any_folder(tmp_path, server, voc_tar):
    # The published MD5 cannot match this small tar: the run must end in a one-line error.
    server.files["/voc.tar"] = voc_tar
    script = Path(__file__).resolve().parents[1] / "tools" / "download_voc.py"
    result = subprocess.run([sys.executable, str(script), "--root", "data", "--no-extract",
                             "--url", server.url("/voc.tar")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("segtrain: error: ") and f"expected {dl.VOC_TRAINVAL.size} bytes" in last
    assert server.requests[-1]["path"] == "/voc.tar"
    assert not (tmp_path / "data" / dl.VOC_TRAINVAL.filename).exists()


@pytest.mark.parametrize("member, expected", [
    ("../evil.txt", "outside the destination"),
    ("VOCdevkit/../../evil.txt", "outside the destination"),
])
def test_tar_path_traversal_is_rejected_before_writing(tmp_path, member, expected):
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_bytes({"VOCdevkit/ok.txt": b"fine", member: b"pwned"}))
    root = tmp_path / "root"
    with pytest.raises(dl.ExtractError, match=expected) as err:
        dl.extract(archive, root, progress=False)
    assert member in str(err.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not (root / "VOCdevkit" / "ok.txt").exists()  # checked before anything is written


def test_tar_symlink_out_of_root_is_rejected(tmp_path):
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_bytes({"VOCdevkit/link": ("symlink", "../../../etc/passwd")}))
    with pytest.raises(dl.ExtractError, match="VOCdevkit/link"):
        dl.extract(archive, tmp_path / "root", progress=False)
    assert not (tmp_path / "root" / "VOCdevkit" / "link").exists()


def test_zip_path_traversal_is_rejected(tmp_path):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes({"SegmentationClassAug/a.png": b"x", "../../evil.png": b"pwned"}))
    with pytest.raises(dl.ExtractError, match=r"\.\./\.\./evil\.png"):
        dl.extract(archive, tmp_path / "root", progress=False)
    assert not (tmp_path / "evil.png").exists()
    assert not (tmp_path / "root" / "SegmentationClassAug").exists()


def test_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "junk.tar"
    archive.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(dl.ExtractError, match="junk.tar: corrupt or unreadable"):
        dl.extract(archive, tmp_path / "root", progress=False)


def test_sbd_labels_and_train_aug_land_in_voc2012(tmp_path, server, monkeypatch, voc_tar):
    use_voc_tar(monkeypatch, server, voc_tar, md5(voc_tar))
    aug_png = label_to_png_bytes(np.full((40, 48), 12, dtype=np.uint8))
    server.files["/aug.zip"] = zip_bytes({
        "SegmentationClassAug/2007_000032.png": aug_png,
        "__MACOSX/SegmentationClassAug/._2007_000032.png": b"finder junk",
    })
    train_aug = b"2007_000032\n2008_000002\n"
    server.files["/train_aug.txt"] = train_aug
    monkeypatch.setattr(dl, "SBD_LABELS", dl.Remote("SegmentationClassAug.zip", (server.url("/aug.zip"),)))
    monkeypatch.setattr(dl, "TRAIN_AUG", dl.Remote("train_aug.txt", (server.url("/train_aug.txt"),),
                                                   size=len(train_aug)))

    voc_root = dl.download_voc(tmp_path, sbd=True, progress=False)

    assert (voc_root / "SegmentationClassAug" / "2007_000032.png").read_bytes() == aug_png
    assert (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").read_bytes() == train_aug
    assert not (voc_root / "__MACOSX").exists()


def test_size_only_check_catches_wrong_train_aug(tmp_path, server):
    server.files["/train_aug.txt"] = b"2007_000032\n"
    remote = dl.Remote("train_aug.txt", (server.url("/train_aug.txt"),), size=dl.TRAIN_AUG.size)
    with pytest.raises(dl.DownloadError, match=f"serves 12 bytes, expected {dl.TRAIN_AUG.size} bytes for train_aug.txt"):
        dl.fetch(remote, tmp_path, progress=False)
    assert not (tmp_path / "train_aug.txt").exists()
