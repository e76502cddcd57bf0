"""pipeline.storage listings: list_files and list_sizes share one walk (hidden names left out, sizes right,
S3 listings see fresh writes); written files follow the umask; URIs carrying credentials are refused. No Ray."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline import storage


def _tree(root):
    files = {
        "a.jpg": b"1",
        "sub/b.PNG": b"22",
        "sub/deep/c.txt": b"333",
        ".hidden": b"x",  # hidden file
        "sub/.tmp-write-d.jpg": b"x",  # a write_bytes_atomic temporary
        ".git/config": b"x",  # inside a hidden folder
    }
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_list_files_and_sizes_walk_the_same_tree(tmp_path):
    _tree(tmp_path)
    want = {"a.jpg": 1, "sub/b.PNG": 2, "sub/deep/c.txt": 3}
    for uri in (str(tmp_path), f"file://{tmp_path}", f"{tmp_path}/"):
        assert storage.list_sizes(uri) == want
        assert list(storage.list_sizes(uri)) == sorted(want)  # sorted by key
        assert storage.list_files(uri) == sorted(want)
    assert storage.list_files(str(tmp_path), (".jpg", ".png")) == ["a.jpg", "sub/b.PNG"]  # case-insensitive
    assert storage.list_files(str(tmp_path), [".TXT"]) == ["sub/deep/c.txt"]
    assert storage.list_files(str(tmp_path / "sub")) == ["b.PNG", "deep/c.txt"]


def test_missing_folder_lists_nothing(tmp_path):
    assert storage.list_files(str(tmp_path / "nope")) == []
    assert storage.list_sizes(str(tmp_path / "nope")) == {}


def test_open_uri_is_gone():
    assert not hasattr(storage, "open_uri")


def test_s3_listing_sees_files_written_after_an_earlier_listing(s3_server, s3_bucket):
    import s3fs

    root = f"{s3_bucket}/tree"
    assert storage.list_sizes(root) == {} and storage.list_files(root) == []  # listed while still empty
    storage.write_bytes_atomic(f"{root}/x/one.jpg", b"1")
    assert storage.list_sizes(root) == {"x/one.jpg": 1}
    other = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)  # a writer elsewhere
    bucket_path = root[len("s3://"):]
    other.pipe_file(f"{bucket_path}/x/two.png", b"22")
    other.pipe_file(f"{bucket_path}/.hidden", b"x")
    assert storage.list_sizes(root) == {"x/one.jpg": 1, "x/two.png": 2}
    assert storage.list_files(root, (".png",)) == ["x/two.png"]
    assert storage.list_files(f"{s3_bucket}/missing") == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    """write_bytes_atomic's temporary file (mkstemp: 0600) gets 0o666 less the umask before the rename, the
    mode a plainly created file would have; current_umask reads it without changing it."""
    saved = os.umask(umask)
    try:
        assert storage.current_umask() == umask
        storage.write_bytes_atomic(str(tmp_path / "a" / "f.bin"), b"x")
        storage.write_bytes_atomic(str(tmp_path / "a" / "f.bin"), b"y")  # replacing an existing file
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")
    finally:
        os.umask(saved)
    mode = stat.S_IMODE((tmp_path / "a" / "f.bin").stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(plain.stat().st_mode)
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"y"


def test_storage_refuses_a_uri_carrying_credentials(tmp_path):
    for uri in ("s3://keyid7:se/cr+et=@bucket/x", "s3://keyid7@bucket/x"):
        with pytest.raises(ValueError, match="must not carry credentials") as err:
            storage.write_bytes_atomic(uri, b"x")
        assert "se/cr+et" not in str(err.value) and "keyid7" not in str(err.value)
    assert storage.list_files(f"file://{tmp_path}/a@b") == []  # '@' in a path is not a credential
