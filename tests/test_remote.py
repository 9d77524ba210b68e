"""Remote manifests: a packed split served over HTTP on 127.0.0.1 (and read through pipe:),
used by training and evaluation by its manifest URL, checked on the streamed bytes."""
import collections
import functools
import http.server
import json
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch

from segtrain import integrity, loaders, sources
from segtrain.config import parse_config
from segtrain.evaluate import main as evaluate_main
from segtrain.files import DataError
from segtrain.checkpoints import save_checkpoint
from segtrain.model import build_model
from segtrain.train import main as train_main

SERVE_TIMEOUT_S = 600  # the server thread stops by itself after this, whatever the test does


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and counts GET requests and bytes sent per path."""

    def do_GET(self):
        self.server.requests[self.path] += 1
        super().do_GET()

    def copyfile(self, source, outputfile):
        data = source.read()
        self.server.bytes_sent[self.path] += len(data)
        outputfile.write(data)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def serve(tmp_path):
    """``serve(folder)`` -> (base URL, server); the server stops at teardown (or after SERVE_TIMEOUT_S)."""
    servers = []

    def start(folder: Path):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(CountingHandler, directory=str(folder)))
        server.requests, server.bytes_sent = collections.Counter(), collections.Counter()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        timer = threading.Timer(SERVE_TIMEOUT_S, server.shutdown)
        timer.daemon = True
        timer.start()
        servers.append((server, timer))
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server, timer in servers:
        timer.cancel()
        server.shutdown()
        server.server_close()


def tar_shards(server):
    return {path: n for path, n in server.requests.items() if path.endswith(".tar")}


def test_remote_manifest_resolves_shards_next_to_it_and_takes_counts_from_it(packed_shards, serve):
    base, server = serve(packed_shards["dir"])
    source = sources.resolve_data(f"{base}/voc-train.json", "train")
    manifest = json.loads(packed_shards["train"].read_text())
    assert source.urls == tuple(f"{base}/{s['file']}" for s in manifest["shards"])
    assert source.digests == tuple(s["sha256"] for s in manifest["shards"])
    assert loaders.batches_per_epoch(source, 4, 1) == 12
    val = sources.resolve_data(f"{base}/voc-train.json", "val")  # the sibling manifest, as for local files
    assert val.location == f"{base}/voc-val.json" and val.split == "val"
    assert sources.resolve_data(f"{base}/voc-val.json").split == "val"  # no split asked: the manifest's
    integrity.verify_source(source, "always")  # nothing up front: checked while streaming
    assert tar_shards(server) == {}


def test_pipe_manifest_resolves_shards_in_the_same_command(packed_shards):
    data = f"pipe:cat {packed_shards['dir']}/voc-train.json"
    source = sources.resolve_data(data, "train")
    assert source.urls[0] == f"pipe:cat {packed_shards['dir']}/voc-train-000000.tar"
    samples = list(integrity.shard_samples(source.urls[:1], digests=source.checks()))
    assert len(samples) == source.shard_sizes[0]


def test_training_and_evaluation_read_by_url_each_shard_once_per_epoch(packed_shards, serve, tmp_path, capsys):
    base, server = serve(packed_shards["dir"])
    run_dir = tmp_path / "run"
    # 48 samples, 12 steps of 4 = one epoch, one process and two loader workers reading through the
    # node's copy; one validation at the end.
    train_main(["--data", f"{base}/voc-train.json", "--run-dir", str(run_dir), "--backbone", "resnet18",
                "--pretrained", "false", "--crop-size", "33", "--batch-size", "4", "--iterations", "12",
                "--workers", "2", "--mixed-precision", "no", "--tracker", "none", "--log-every", "6"])
    manifests = {name: json.loads((packed_shards["dir"] / name).read_text()) for name in ("voc-train.json",
                                                                                          "voc-val.json")}
    train_files = split_bytes(packed_shards, "train")
    fetched = tar_shards(server)
    assert {p: fetched[p] for p in train_files} == {p: 1 for p in train_files}  # once in the epoch, 2 workers
    assert sum(server.bytes_sent[p] for p in train_files) == sum(train_files.values())
    # Validation splits its 16 samples by sample over its 2 workers: [0, 8) and [8, 16) both open shard 0.
    assert {p: n for p, n in fetched.items() if p not in train_files} == {"/voc-val-000000.tar": 2,
                                                                           "/voc-val-000001.tar": 1}
    config = parse_config(["--config", str(run_dir / "config.yaml")])
    assert config.data == f"{base}/voc-train.json"

    server.requests.clear()
    evaluate_main(["--checkpoint", str(run_dir / "best.pt"), "--data", f"{base}/voc-val.json", "--workers", "0"])
    assert tar_shards(server) == {f"/{s['file']}": 1 for s in manifests["voc-val.json"]["shards"]}
    assert "mIoU" in capsys.readouterr().out


# --------------------------------------------------------------------------- one copy per node

def split_bytes(packed_shards, split: str) -> dict[str, int]:
    return {f"/{s['file']}": s["bytes"] for s in json.loads(packed_shards[split].read_text())["shards"]}


def batches(loader) -> list:
    return [(images, masks, list(ids)) for images, masks, ids in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


def test_remote_training_data_is_fetched_once_per_node_per_epoch_with_two_workers(packed_shards, serve):
    """Two ranks of one node, two loader workers each: every shard crosses the network once, the
    batches are those of a local read, and the node's copy is gone when the ranks are done."""
    base, server = serve(packed_shards["dir"])
    files = split_bytes(packed_shards, "train")
    source = sources.resolve_data(f"{base}/voc-train.json", "train")
    kwargs = dict(batch_size=4, crop_size=33, seed=3, world_size=2)
    local = sources.resolve_data(packed_shards["train"], "train")
    expected = [batches(loaders.train_loader(local, num_workers=0, rank=r, **kwargs)[0]) for r in range(2)]

    streamed = [loaders.train_loader(source, num_workers=2, rank=r, node_cache_gb=0, **kwargs)[0] for r in range(2)]
    got = [batches(loader) for loader in streamed]
    assert got[0] and all(same(g, e) for g, e in zip(got, expected))
    without = sum(server.bytes_sent[p] for p in files)
    assert without > 1.9 * sum(files.values())  # what it fixes: each worker fetched its rank's share

    server.bytes_sent.clear()
    cached = [loaders.train_loader(source, num_workers=2, rank=r, node_cache_gb=1, **kwargs)[0] for r in range(2)]
    got = [[], []]
    for pair in zip(*cached):  # the ranks run side by side, as on one node
        for rank, batch in enumerate(pair):
            got[rank].append((batch[0], batch[1], list(batch[2])))
    assert all(same(g, e) for g, e in zip(got, expected))
    assert {p: server.bytes_sent[p] for p in files} == files  # 1.0x the split: each shard once
    assert not cached[0].cache.folder.exists()  # the last rank to finish removed it


def test_the_node_copy_serves_every_epoch_stays_within_its_bound_and_checks_sha256(packed_shards, serve, tmp_path):
    base, server = serve(packed_shards["dir"])
    files = split_bytes(packed_shards, "train")
    source = sources.resolve_data(f"{base}/voc-train.json", "train")
    loader, steps = loaders.train_loader(source, 4, 33, num_workers=2, node_cache_gb=1, endless=True, last_epoch=1)
    assert len(batches(loader)) == 2 * steps
    assert {p: server.bytes_sent[p] for p in files} == files  # the split fits: one fetch for both epochs

    server.bytes_sent.clear()
    bound = 2.5 * max(files.values()) / 1e9  # room for two shards: older ones make way
    loader, _ = loaders.train_loader(source, 4, 33, num_workers=2, node_cache_gb=bound)
    held = []
    for _ in loader:
        held.append(loader.cache.nbytes())
    assert max(held) <= bound * 1e9 and sum(server.bytes_sent[p] for p in files) >= sum(files.values())

    served = tmp_path / "served"
    shutil.copytree(packed_shards["dir"], served)
    corrupt_padding_byte(served / "voc-train-000002.tar")
    base, _ = serve(served)
    source = sources.resolve_data(f"{base}/voc-train.json", "train")
    loader, _ = loaders.train_loader(source, 4, 33, num_workers=2, node_cache_gb=1)
    with pytest.raises(DataError, match=r"shard .*voc-train-000002\.tar: sha256 \w+\.\.\. differs from its manifest"):
        batches(loader)
    assert not loader.cache.folder.exists()


def corrupt_padding_byte(shard: Path) -> None:
    """Flip a byte of the zero padding after a member's data: tar and image decoding are unaffected,
    only the shard's sha256 tells."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.size % 512)
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_a_corrupted_byte_on_the_server_is_a_one_line_sha256_error(packed_shards, serve, tmp_path, capsys):
    served = tmp_path / "served"
    shutil.copytree(packed_shards["dir"], served)
    corrupt_padding_byte(served / "voc-val-000001.tar")
    base, _ = serve(served)
    data = f"{base}/voc-val.json"
    with pytest.raises(DataError, match=r"shard .*voc-val-000001\.tar: sha256 \w+\.\.\. differs from its manifest"):
        list(loaders.iter_samples(sources.resolve_data(data, "val")))
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(make_checkpoint(tmp_path)), "--data", data, "--workers", "0"])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("segtrain:")]  # the rest is the progress bar
    assert len(said) == 1 and "voc-val-000001.tar: sha256" in said[0] and "Traceback" not in err, err


def make_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, build_model(backbone="resnet18", pretrained=False).eval())
    return path
