"""Bad files, made at random (hypothesis), fed to the image loader and to the prepare step.

The promise: whatever a file holds, the only outcomes are a loaded image or the one-line error naming
the file; never a crash, a hang or a half-written cache. The files are real encodings (PNG, JPEG, BMP,
GIF, WEBP, TIFF, by Pillow or OpenCV, from random pixels) truncated or corrupted at random, random
bytes behind an image format's magic number, any of them under any image extension, headers that
claim far more pixels than the file could hold (decompression bombs), links that loop or lead
nowhere, and files and folders this user may not read. Example counts are small and the search is
derandomized, so that CI runs the same examples every time.
"""

import io
import multiprocessing
import os
import re
import resource
import shutil
import struct
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnlab.data import ImageFolderSource
from cnnlab.data.imagefolder import EXTENSIONS, MAX_PIXELS, decode
from cnnlab.errors import ConfigError
from conftest import run_script
from test_real_images import crops  # noqa: F401 (a fixture)

SIZE = 16  # stored_size: small, the files are what is tested
# The same examples on every run, none remembered between runs; a deadline per example catches a
# file that takes long to refuse (a hang), with room for a busy 2-core machine.
FUZZ = dict(derandomize=True, database=None, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
ONE_LINE = re.compile(r"^[A-Za-z]+(Error|Exception)?: \S.*$")  # "OSError: image file is truncated ..."


# -- files -------------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, idat: bytes = zlib.compress(b"\0" * 300)) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def gif_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    return b"GIF89a" + screen + b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;"


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 64, 0, 0, 54) + info + b"\0" * 64


def jpeg_header(width: int, height: int) -> bytes:
    tables = b"\xff\xdb" + struct.pack(">H", 67) + b"\0" + bytes(range(1, 65))
    frame = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + tables + frame + b"\xff\xd9"


BOMB_HEADERS = {"png": png_header, "gif": gif_header, "bmp": bmp_header, "jpeg": jpeg_header}
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"GIF89a", b"BM",
         b"RIFF\0\0\0\0WEBPVP8 ", b"RIFF\0\0\0\0WEBPVP8L", b"II*\0", b"MM\0*"]
PIL_FORMATS = ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"]
CV2_FORMATS = [".png", ".jpg", ".bmp", ".webp"]


@st.composite
def encodings(draw) -> bytes:
    """A real image file's bytes: random pixels of a random mode and size, by Pillow or OpenCV."""
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 3), np.uint8)
    if draw(st.booleans()):
        ok, encoded = cv2.imencode(draw(st.sampled_from(CV2_FORMATS)), pixels)
        assert ok
        return encoded.tobytes()
    image = Image.fromarray(pixels).convert(draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1"])))
    file_format = draw(st.sampled_from(PIL_FORMATS))
    if image.mode == "RGBA" and file_format in ("JPEG", "BMP"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, file_format)
    return buffer.getvalue()


@st.composite
def corrupted(draw, data: bytes) -> bytes:
    """``data`` truncated, with bytes overwritten, with junk inserted, or left whole."""
    data = bytearray(data)
    how = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
    if how == "truncate":
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    if how == "overwrite":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    at = draw(st.integers(0, len(data)))
    return bytes(data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:])


@st.composite
def bombs(draw) -> bytes:
    """A header of a few dozen bytes that claims more pixels than an image may have."""
    kind = draw(st.sampled_from(sorted(BOMB_HEADERS)))
    # A JPEG is decoded at a reduced scale (draft), so only a header past twice the limit is refused unread.
    limit = 2 * MAX_PIXELS if kind == "jpeg" else MAX_PIXELS
    width = draw(st.integers(limit // 65535 + 1, 65535))
    height = draw(st.integers(limit // width + 1, 65535))
    return BOMB_HEADERS[kind](width, height)


def bad_bytes():
    """Any file that should not load (or may, when a corruption missed): what the fuzzing draws from."""
    return st.one_of(
        encodings().flatmap(corrupted),
        st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGIC), st.binary(max_size=300)),
        bombs(),
    )


def image_names():
    """A file name with any of the loader's extensions, in any case: the content decides, not the name."""
    return st.builds(lambda stem, ext, upper: f"{stem}{ext.upper() if upper else ext}",
                     st.sampled_from(["a", "photo", "x_1"]), st.sampled_from(sorted(EXTENSIONS)), st.booleans())


def assert_image_or_one_line(result) -> None:
    pixels, note = result
    if pixels is None:
        assert ONE_LINE.match(note) and "\n" not in note, note
    else:
        assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
        assert re.fullmatch(r"[0-9a-f]{64}", note)


# -- the loader --------------------------------------------------------------------------------------

@settings(max_examples=60, **FUZZ)
@given(data=encodings(), name=image_names())
def test_any_real_encoding_under_any_image_extension_loads(data, name):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, name)
        path.write_bytes(data)
        pixels, note = decode(path, SIZE)
        assert pixels is not None, f"{name}: {note}"  # PNG bytes named .jpg are still an image
        assert_image_or_one_line((pixels, note))


@settings(max_examples=120, **FUZZ)
@given(data=bad_bytes(), name=image_names())
def test_a_corrupted_truncated_or_random_file_loads_or_is_refused_in_one_line(data, name):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, name)
        path.write_bytes(data)
        assert_image_or_one_line(decode(path, SIZE))


@settings(max_examples=30, **FUZZ)
@given(data=bombs())
def test_a_header_claiming_huge_dimensions_is_refused_before_it_is_decoded(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "bomb.png")
        path.write_bytes(data)
        start = time.perf_counter()
        pixels, note = decode(path, SIZE)
        assert pixels is None and note.startswith("DecompressionBombError: "), note
        assert time.perf_counter() - start < 1.0  # read the header, refused: nothing was allocated or decoded


def small_png_of_many_pixels(path: Path, side: int) -> Path:
    """A real, complete PNG of side x side black pixels: a few hundred kB that decode to 3 * side**2 bytes."""
    row = b"\0" * (3 * side + 1)  # filter byte + RGB
    compressor = zlib.compressobj(6)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(png_header(side, side, idat))
    return path


def _decode_measuring_memory(path: str, pil_limit) -> tuple[str, float]:
    """In a fresh decoding process: the outcome, and how much the peak memory grew (MB) while decoding."""
    Image.MAX_IMAGE_PIXELS = pil_limit  # another library may have turned Pillow's own check off
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pixels, note = decode(Path(path), SIZE)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return ("image" if pixels is not None else note), grown


@pytest.mark.parametrize("pil_limit", [Image.MAX_IMAGE_PIXELS, None], ids=["pillow-limit", "pillow-limit-off"])
def test_a_small_file_that_decodes_to_gigabytes_is_refused_without_the_memory(tmp_path, pil_limit):
    """144 megapixels in 420 kB: Pillow only warns (up to 179 megapixels) and decoding took 1.6 GB. Measured
    in a forked process, whose peak memory starts at what it shares with this one."""
    files = [small_png_of_many_pixels(tmp_path / "scan.png", 12_000),
             tmp_path / "claims.jpg", tmp_path / "claims.png"]
    files[1].write_bytes(jpeg_header(65_000, 65_000))
    files[2].write_bytes(png_header(100_000, 100_000))
    assert files[0].stat().st_size < 500_000
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        for path in files:
            note, grown = pool.submit(_decode_measuring_memory, str(path), pil_limit).result(timeout=60)
            assert note.startswith("DecompressionBombError: "), (path.name, note)
            assert grown < 100, f"{path.name}: decoding took {grown:.0f} MB more before it was refused"
    assert "12000 x 12000 px is more than the 89,478,485 pixels" in decode(files[0], SIZE)[1]


# -- the prepare step --------------------------------------------------------------------------------

def photo_tree(root: Path, crops, per_class: int = 3) -> Path:  # noqa: F811
    """root/<class>/: a few real photos per class (test_real_images' crops)."""
    for name, files in crops.items():
        (root / name).mkdir(parents=True)
        for path in files[:per_class]:
            shutil.copyfile(path, root / name / path.name)
    return root


def assert_nothing_left(cache_root: Path) -> None:
    """No cache, no temporary folder, no lock file: a failed prepare leaves the cache root as it found it."""
    assert not cache_root.exists() or list(cache_root.iterdir()) == []


def assert_one_cache(cache_root: Path, cache) -> None:
    assert [p.name for p in cache_root.iterdir()] == [cache.dir.name]  # no temporary folder or lock file


@st.composite
def bad_folder_contents(draw) -> list[tuple[str, bytes | str]]:
    """1-3 (class/name, bytes) files, or (class/name, "->target") links that loop or lead nowhere."""
    entries = []
    for i in range(draw(st.integers(1, 3))):
        folder = draw(st.sampled_from(["china", "flower", "hopper"]))
        name = f"{folder}/bad{i}_{draw(image_names())}"
        kind = draw(st.sampled_from(["bytes", "bytes", "bytes", "loop", "dangling"]))
        if kind == "bytes":
            entries.append((name, draw(bad_bytes())))
        else:
            entries.append((name, f"->{Path(name).name}" if kind == "loop" else "->gone.png"))
    return entries


def write_entries(root: Path, entries) -> None:
    for name, content in entries:
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            (root / name).symlink_to(content[2:])  # relative: beside itself


@settings(max_examples=25, **FUZZ)
@given(entries=bad_folder_contents(), skip=st.booleans())
def test_prepare_with_bad_files_skips_exactly_them_or_stops_in_one_line_leaving_nothing(crops, entries,  # noqa: F811
                                                                                       skip):
    with tempfile.TemporaryDirectory() as folder:
        root, cache_root = photo_tree(Path(folder, "images"), crops), Path(folder, "cache")
        write_entries(root, entries)
        # what the loader makes of each file (its every outcome is checked above): None when unreadable
        unreadable = sorted(name for name, _ in entries if decode(root / name, SIZE)[0] is None)
        assert all(name in unreadable for name, content in entries if isinstance(content, str))
        source = ImageFolderSource(root, cache_root, stored_size=SIZE, val_fraction=0.0, test_fraction=0.0,
                                   skip_bad_images=skip, workers=1)
        if unreadable and not skip:
            with pytest.raises(ConfigError) as error:
                source.prepare()
            message = str(error.value)
            assert "\n" not in message and message.startswith(f"{len(unreadable)} unreadable image(s) under {root}: ")
            assert all(f"{name} (" in message for name in unreadable)
            assert_nothing_left(cache_root)
            return
        cache = source.prepare()
        assert sorted(entry["file"] for entry in cache.meta["skipped"]) == unreadable
        assert all(ONE_LINE.match(entry["error"]) for entry in cache.meta["skipped"])
        kept = {entry["file"] for entry in cache.meta["files"]}
        assert len(kept) == 9 + len(entries) - len(unreadable) and not kept & set(unreadable)
        assert cache.split("train").images.shape == (len(kept), SIZE, SIZE, 3)
        assert_one_cache(cache_root, cache)


@pytest.mark.timeout(60)
def test_link_loops_end_and_links_to_nothing_are_named_not_dropped(tmp_path, crops):  # noqa: F811
    root = photo_tree(tmp_path / "images", crops)
    (root / "china" / "again").symlink_to(root / "china")  # a folder that holds itself
    (root / "flower" / "up").symlink_to(root)  # a folder that holds every class
    (root / "flower" / "a.jpg").symlink_to("b.jpg")  # a.jpg -> b.jpg -> a.jpg
    (root / "flower" / "b.jpg").symlink_to("a.jpg")
    (root / "hopper" / "gone.png").symlink_to(tmp_path / "deleted.png")
    linked = sorted(["flower/a.jpg", "flower/b.jpg", "hopper/gone.png"])
    with pytest.raises(ConfigError) as error:
        ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE).prepare()
    assert "\n" not in str(error.value) and str(error.value).startswith(f"3 unreadable image(s) under {root}: ")
    assert all(re.search(rf"{name} \((OSError|FileNotFoundError): \[Errno ", str(error.value)) for name in linked)
    assert_nothing_left(tmp_path / "cache")
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE, skip_bad_images=True).prepare()
    assert sorted(entry["file"] for entry in cache.meta["skipped"]) == linked
    assert sorted(entry["file"] for entry in cache.meta["files"]) == sorted(
        str(path.relative_to(root)) for path in root.glob("*/*") if not path.is_symlink())  # each photo once


NOBODY = 65534


def _as_nobody(task, *args):
    try:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except PermissionError:  # root without the capability to change user (some containers)
        return "cannot become nobody"
    return task(*args)


def as_another_user(task, *args):
    """Run ``task`` where file permissions apply: here, or (as root, whom they do not stop) in a forked
    process that has become the user nobody. Returns what it returns, or raises what it raised."""
    if os.geteuid() != 0:
        return task(*args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        result = pool.submit(_as_nobody, task, *args).result(timeout=120)
    if result == "cannot become nobody":
        pytest.skip("running as root, whom permissions do not stop, and unable to become another user")
    return result


def _prepare(root: str, cache_root: str, skip: bool):
    cache = ImageFolderSource(root, cache_root, stored_size=SIZE, skip_bad_images=skip, workers=1).prepare()
    return cache.meta["skipped"], sorted(p.name for p in Path(cache_root).iterdir())


def test_a_file_or_folder_this_user_may_not_read_is_named_in_one_line(crops):  # noqa: F811
    with tempfile.TemporaryDirectory() as folder:  # not under pytest's tmp_path: the user nobody must reach it
        os.chmod(folder, 0o755)
        root, cache_root = photo_tree(Path(folder, "images"), crops), Path(folder, "cache")
        cache_root.mkdir(mode=0o777)
        os.chmod(cache_root, 0o777)
        locked = root / "china" / "locked.png"
        shutil.copyfile(crops["china"][5], locked)
        locked.chmod(0)
        with pytest.raises(ConfigError) as error:
            as_another_user(_prepare, str(root), str(cache_root), False)
        assert str(error.value).startswith(f"1 unreadable image(s) under {root}: china/locked.png (PermissionError: ")
        assert "\n" not in str(error.value) and list(cache_root.iterdir()) == []
        skipped, left = as_another_user(_prepare, str(root), str(cache_root), True)
        assert [entry["file"] for entry in skipped] == ["china/locked.png"] and len(left) == 1
        (root / "hopper" / "2019").mkdir()
        shutil.copyfile(crops["hopper"][5], root / "hopper" / "2019" / "unseen.jpg")
        (root / "hopper" / "2019").chmod(0)  # its images were dropped without a word
        with pytest.raises(ConfigError, match=rf"^cannot list {root / 'hopper' / '2019'} \(Permission denied\): "):
            as_another_user(_prepare, str(root), str(cache_root), True)
        (root / "hopper" / "2019").chmod(0o755)  # let the temporary folder be removed


@pytest.mark.slow
def test_prepare_stops_on_bad_files_with_one_line_naming_each_and_exit_code_2(tmp_path, crops):  # noqa: F811
    root = photo_tree(tmp_path / "images", crops)
    (root / "china" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (root / "flower" / "noise.webp").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "hopper" / "loop.jpg").symlink_to("loop.jpg")
    result = run_script("prepare.py", "data=imagefolder", f"data.source.root={root}", f"paths.root_dir={tmp_path}",
                        f"data.source.stored_size={SIZE}", timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert line.startswith(f"Error: 3 unreadable image(s) under {root}: china/bomb.png (DecompressionBombError: ")
    assert "flower/noise.webp (UnidentifiedImageError: " in line and "hopper/loop.jpg (OSError: " in line
    assert_nothing_left(tmp_path / "data")
