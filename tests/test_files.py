"""Result files are written whole or not at all (cnnlab/files.py)."""

import os
import signal
import subprocess
import sys

import pytest

from cnnlab.files import write_text, written_whole


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = write_text(tmp_path / "metrics.json", '{"acc": 0.5}')
    with pytest.raises(RuntimeError):
        with written_whole(path) as partial:
            partial.write_text('{"acc": 0.')  # half of the new file, then the writer fails
            raise RuntimeError("disk full")
    assert path.read_text() == '{"acc": 0.5}' and os.listdir(tmp_path) == ["metrics.json"]
    write_text(path, '{"acc": 0.75}')
    assert path.read_text() == '{"acc": 0.75}' and os.listdir(tmp_path) == ["metrics.json"]


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    """SIGKILL while the new text is half written: the old file is what a reader finds."""
    path = write_text(tmp_path / "metrics.json", "old")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, sys
from cnnlab.files import written_whole
with written_whole({str(path)!r}) as partial:
    with open(partial, "w") as file:
        file.write("half of the new")
        file.flush()
        print("writing", flush=True)
        sys.stdin.readline()  # killed here
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == [".metrics.partial.json", "metrics.json"]  # the next write replaces it
