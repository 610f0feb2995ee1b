"""Storage that refuses the output: a clear message naming the path, exit 2 before any shard ran, 1 after.

Never a traceback. Tests run as root, whom chmod does not stop: read-only and full file systems are
tmpfs mounts in a private mount namespace (`unshare -m`, gone with the command), and a permission
error is the CLI run as `nobody` (`setpriv`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, cli, save_mlp, write_files
from s3 import BUCKET, FaultProxy, S3Server, s3, s3_server  # noqa: F401 - fixtures


@pytest.fixture
def job(tmp_path: Path) -> list[str]:
    write_files(tmp_path / "in", [100], features=4, row_group_size=100)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    return ["--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in")]


def _refused(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in message, message
    return message


def _in_mount(mount: str, setup: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a private mount namespace where `mount` is a fresh tmpfs (`setup` runs first)."""
    command = (f"mount -t tmpfs {mount} && {setup} cd {shlex.quote(str(REPO))} && "
               f"exec {shlex.quote(sys.executable)} -m pipelines {' '.join(shlex.quote(a) for a in args)}")
    return subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=240)


def test_an_output_that_is_a_file_or_under_one(job: list[str], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    _refused(cli("run", *job, "--output", str(tmp_path / "afile")), 2, f"the output {tmp_path / 'afile'} is a file")
    _refused(cli("run", *job, "--output", str(tmp_path / "afile" / "sub" / "out")), 2,
             f"lies under {tmp_path / 'afile'}, which is a file")
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_a_read_only_file_system(job: list[str], tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    result = _in_mount(f"-o ro,size=1m tmpfs {tmp_path / 'ro'}", "", ["run", *job, "--output", str(tmp_path / "ro" / "out")])
    _refused(result, 2, "read-only file system", str(tmp_path / "ro" / "out"), "nothing was processed")


def test_no_space_left_before_any_shard_runs(job: list[str], tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    fill = f"head -c 1048576 /dev/zero > {tmp_path / 'full' / 'filler'} 2>/dev/null;"
    result = _in_mount(f"-o size=64k tmpfs {tmp_path / 'full'}", fill, ["run", *job, "--output", str(tmp_path / "full" / "out")])
    _refused(result, 2, "no space left on the device", str(tmp_path / "full" / "out"))


def test_no_space_left_once_shards_run(tmp_path: Path) -> None:
    write_files(tmp_path / "in", [20000, 20000], features=4, row_group_size=10000)
    save_mlp(tmp_path / "m.pt", [4, 8, 1], seed=3)
    (tmp_path / "full").mkdir()
    fill = f"head -c 100000 /dev/zero > {tmp_path / 'full' / 'filler'};"  # room for the lock, not a shard
    out = tmp_path / "full" / "out"
    result = _in_mount(f"-o size=128k tmpfs {tmp_path / 'full'}", fill,
                       ["run", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "in"), "--output",
                        str(out), "--shard-rows", "10000"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "No space left on device" in result.stdout and f"{out}/.part-0000-00000.parquet." in result.stdout


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory `nobody` can enter (pytest's own are root's alone); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="batch-infer-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_permission_denied(shared_dir: Path) -> None:
    write_files(shared_dir / "in", [100], features=4, row_group_size=100)
    save_mlp(shared_dir / "m.pt", [4, 8, 1], seed=3)
    (shared_dir / "out").mkdir(mode=0o755)  # root's: `nobody` may read, not write
    for path in shared_dir.rglob("*"):
        path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else 0o644)
    args = ["run", "--model", str(shared_dir / "m.pt"), "--input", str(shared_dir / "in"),
            "--output", str(shared_dir / "out")]
    result = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                             sys.executable, "-m", "pipelines", *args], capture_output=True, text=True,
                            timeout=240, cwd=REPO, env={**os.environ, "HOME": str(shared_dir)})
    _refused(result, 2, "permission denied", str(shared_dir / "out"))
    assert list((shared_dir / "out").iterdir()) == []


def test_s3_access_denied_and_a_missing_bucket(s3: FaultProxy, s3_server: S3Server, job: list[str]) -> None:
    s3.fail(None, r"^/batch-infer-test/denied/", status=403, code="AccessDenied")
    _refused(cli("run", *job, "--output", s3.uri("denied/out")), 2, "permission denied", "denied/out")
    missing = s3.uri("denied/out").replace(f"s3://{BUCKET}/", "s3://no-such-bucket-here/")
    _refused(cli("run", *job, "--output", missing), 2, "the bucket does not exist", "no-such-bucket-here")
