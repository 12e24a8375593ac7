from conftest import Mount


def test_write_read_remount(mount: Mount) -> None:
    p = mount.path / "hello.txt"
    p.write_bytes(b"hello world")
    big = mount.path / "big.bin"
    data = bytes(range(256)) * 40000  # ~10 MiB, crosses chunk boundaries
    big.write_bytes(data)
    assert p.read_bytes() == b"hello world"
    mount.restart()
    assert p.read_bytes() == b"hello world"
    assert big.read_bytes() == data
    assert sorted(x.name for x in mount.path.iterdir()) == ["big.bin", "hello.txt"]
