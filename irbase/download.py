"""Download the full MS MARCO passage data into the layout the readers expect.

    python -m irbase.download --layout msmarco --dest data/msmarco            # official files
    python -m irbase.download --layout mteb --dest data/msmarco-beir          # BEIR / mteb layout
    python -m irbase.download --layout msmarco --dest data/msmarco --with-optional   # + triples, top1000

Downloads resume from a `.part` file after an interruption (HTTP Range), are checked against the
published md5 (or the announced size) and only then renamed into place; archives are extracted
through a temporary directory. Then evaluate with e.g. `--data data/msmarco --split dev.small`.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import yaml
from tqdm import tqdm

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


@dataclass
class Source:
    name: str
    url: str
    md5: str | None = None
    size: int | None = None
    extract: bool = False
    optional: bool = False


def load_sources(layout: str, sources_file: str | Path | None = None,
                 base_url: str | None = None) -> list[Source]:
    text = (Path(sources_file).read_text(encoding="utf-8") if sources_file
            else resources.files("irbase").joinpath("sources.yaml").read_text(encoding="utf-8"))
    layouts = yaml.safe_load(text)
    if layout not in layouts:
        raise ValueError(f"--layout {layout!r}: expected one of {', '.join(layouts)}")
    spec = layouts[layout]
    base = (base_url or spec["base_url"]).rstrip("/") + "/"
    for f in spec["files"]:
        md5 = f.get("md5")
        if md5 is not None and not (isinstance(md5, str) and re.fullmatch(r"[0-9a-f]{32}", md5)):
            raise ValueError(f"{sources_file or 'sources.yaml'}: md5 of {f['name']} must be a quoted "
                             f"32-digit hex string, got {md5!r}")
    return [Source(f["name"], base + f["name"], f.get("md5"), f.get("size"), bool(f.get("extract")),
                   bool(f.get("optional"))) for f in spec["files"]]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, source: Source, expected_size: int | None) -> None:
    size = path.stat().st_size
    want = source.size or expected_size
    if want is not None and size != want:
        raise DownloadError(f"{source.url}: got {size} bytes, expected {want}")
    if source.md5 and _md5(path) != source.md5:
        raise DownloadError(f"{source.url}: md5 mismatch (expected {source.md5})")


def fetch(source: Source, dest: Path, retries: int = 5, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download `source` to `dest`, resuming a partial `.part` file; verified before the rename."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    total: int | None = None
    for attempt in range(1, retries + 1):
        offset = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(source.url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if offset and response.status != 206:  # server ignored Range: start over
                    offset = 0
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                with open(part, "ab" if offset else "wb") as f, tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name,
                        disable=not progress) as bar:
                    while block := response.read(CHUNK):
                        f.write(block)
                        bar.update(len(block))
            if total is not None and part.stat().st_size < total:
                raise urllib.error.URLError(f"connection closed at {part.stat().st_size}/{total} bytes")
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left to send: the part file is complete
                break
            raise DownloadError(f"{source.url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            if attempt == retries:
                raise DownloadError(f"{source.url}: failed after {retries} attempts ({exc}); "
                                    f"run again to resume from {part}") from exc
            log.warning("%s: %s; resuming (attempt %d/%d)", source.name, exc, attempt + 1, retries)
            time.sleep(min(2 ** attempt, 30) * 0.1)
    try:
        _verify(part, source, total)
    except DownloadError:
        part.unlink(missing_ok=True)  # a corrupt file is never kept or resumed from
        raise
    os.replace(part, dest)
    return dest


def extract(archive: Path, dest_dir: Path) -> list[str]:
    """Unpack a tar archive through a temporary directory, then move its files into `dest_dir`."""
    marker = dest_dir / f".{archive.name}.extracted"
    if marker.exists():
        return marker.read_text(encoding="utf-8").split()
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".extract-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        names = []
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                os.replace(path, dest_dir / path.name)
                names.append(path.name)
    marker.write_text("\n".join(names), encoding="utf-8")
    return names


def download(layout: str, dest: str | Path, *, with_optional: bool = False, base_url: str | None = None,
             sources_file: str | Path | None = None, keep_archives: bool = False,
             progress: bool = True) -> list[Path]:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for source in load_sources(layout, sources_file, base_url):
        if source.optional and not with_optional:
            log.info("skipping optional %s (pass --with-optional)", source.name)
            continue
        target = dest / source.name
        if source.extract and (dest / f".{source.name}.extracted").exists():
            written += [dest / n for n in (dest / f".{source.name}.extracted").read_text().split()]
            continue
        path = fetch(source, target, progress=progress)
        if source.extract:
            written += [dest / name for name in extract(path, dest)]
            if not keep_archives:
                path.unlink()
        else:
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m irbase.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=["msmarco", "mteb"], default="msmarco")
    parser.add_argument("--dest", required=True, help="directory to fill")
    parser.add_argument("--with-optional", action="store_true", help="also the large optional files")
    parser.add_argument("--base-url", help="a mirror holding the same file names")
    parser.add_argument("--sources", help="a sources YAML replacing the built-in one")
    parser.add_argument("--keep-archives", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = download(args.layout, args.dest, with_optional=args.with_optional, base_url=args.base_url,
                         sources_file=args.sources, keep_archives=args.keep_archives)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
