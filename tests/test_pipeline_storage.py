"""pipeline.storage listings: list_files and list_sizes share one walk (hidden names left out, sizes right,
S3 listings see fresh writes). No Ray."""

from __future__ import annotations

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
