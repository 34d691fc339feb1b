"""Install detectron2's pure-Python code into the running interpreter's environment.

detectron2 is not installable by name from PyPI. Its Python code (Apache-2.0) comes from the
``sal-detectron2`` wheel, pinned by version and sha256: only the ``detectron2/`` package is
unpacked into site-packages, without the compiled ``_C`` extension (built for another Python;
Faster R-CNN and RetinaNet fall back to torchvision's RoIAlign and NMS), and the dependencies
that its detection models import are installed with pip.

    python scripts/install_detectron2.py            # install (a no-op when already done)
    python scripts/install_detectron2.py --check    # exit 1 unless it is installed and imports

Run it with the environment's own interpreter (``.venv/bin/python``); ``make test`` and
``.ci/run`` do. The downloaded wheel is kept in ``<xaibench cache>/wheels``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

VERSION = "0.7.2"
WHEEL = f"sal_detectron2-{VERSION}-cp310-none-any.whl"
SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
DEPENDENCIES = [
    "fvcore==0.1.5.post20221221",
    "iopath==0.1.10",
    "omegaconf==2.3.0",
    "cloudpickle>=2.0",
]
"""What detectron2's config, modeling and checkpoint code imports; the same list is the
``detectron2`` extra in pyproject.toml (a test checks that they agree)."""
MARKER = ".xaibench-install"
"""A file inside the unpacked package naming the wheel and its sha256."""
COMPILED_SUFFIXES = (".so", ".pyd", ".dll", ".dylib")


def cache_dir() -> Path:
    """The xaibench cache root (same rule as ``xaibench.cache.cache_dir``)."""
    if env := os.environ.get("XAIBENCH_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "xaibench"
    return Path.home() / ".cache" / "xaibench"


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit(f"install_detectron2: `{' '.join(command)}` failed (see above)")


def installed_marker(target: Path) -> str | None:
    marker = target / "detectron2" / MARKER
    return marker.read_text().strip() if marker.is_file() else None


def import_check() -> str | None:
    """None if detectron2 and its detection models import in a fresh interpreter, else why not."""
    code = (
        "import detectron2, detectron2.modeling, detectron2.checkpoint, detectron2.config; "
        f"assert detectron2.__version__ == {VERSION!r}, detectron2.__version__"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or ["(no output)"])[-1]


def fetch_wheel(folder: Path) -> Path:
    """The pinned wheel in ``folder``, downloaded if missing; raises if its sha256 differs."""
    wheel = folder / WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        pip(
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--python-version",
            "3.10",
            "--dest",
            str(folder),
            f"sal-detectron2=={VERSION}",
        )
    actual = sha256(wheel)
    if actual != SHA256:
        wheel.unlink()
        raise SystemExit(
            f"install_detectron2: {wheel} has sha256 {actual}, expected {SHA256}; "
            "the file was removed, run the script again to download it afresh"
        )
    return wheel


def unpack(wheel: Path, target: Path) -> int:
    """Unpack the wheel's ``detectron2/`` package (no compiled files) into ``target``;
    returns the number of files written."""
    package = target / "detectron2"
    if package.exists():
        shutil.rmtree(package)
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            if not name.startswith("detectron2/") or member.is_dir():
                continue
            if name.endswith(COMPILED_SUFFIXES):
                continue
            archive.extract(member, target)
            count += 1
    (package / MARKER).write_text(f"{WHEEL} sha256={SHA256}\n")
    return count


def install(force: bool = False) -> None:
    target = site_packages()
    expected = f"{WHEEL} sha256={SHA256}"
    if not force and installed_marker(target) == expected and import_check() is None:
        print(f"install_detectron2: detectron2 {VERSION} already installed in {target}")
        return
    if (target / "detectron2").exists() and installed_marker(target) is None and not force:
        raise SystemExit(
            f"install_detectron2: {target / 'detectron2'} exists and was not installed by this "
            "script; pass --force to replace it"
        )
    pip("install", "--quiet", *DEPENDENCIES)
    wheel = fetch_wheel(cache_dir() / "wheels")
    count = unpack(wheel, target)
    problem = import_check()
    if problem is not None:
        raise SystemExit(f"install_detectron2: detectron2 does not import: {problem}")
    print(f"install_detectron2: detectron2 {VERSION} ({count} files) installed in {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that it imports")
    parser.add_argument("--force", action="store_true", help="reinstall, replacing any detectron2")
    args = parser.parse_args()
    if args.check:
        problem = import_check()
        if problem is not None:
            raise SystemExit(f"install_detectron2: detectron2 does not import: {problem}")
        print(f"install_detectron2: detectron2 {VERSION} imports")
        return
    install(force=args.force)


if __name__ == "__main__":
    main()
