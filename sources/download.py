"""
Downloads checked by sha256, for the instruments that fetch released files (autoencoders, DiT / LDM checkpoints,
Inception): atomic, so a failed or mismatching download leaves nothing behind, and every failure one clear error.
Every downloader in nanoCEP also takes a local path, so nothing here runs on an offline machine.

Nothing to run here; weights/ and scoring/ import it (it sits in sources/, the core, so those instruments need no
arrow to each other).
"""
import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

from plumbing.common import atomic_open


def file_hash(path, algorithm: str = "sha256") -> str:
    """Hex digest (sha256 unless told otherwise) of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest, sha256: str | None = None, headers: dict | None = None, quiet: bool = False) -> Path:
    """Fetch url to dest atomically (a line on stderr says so unless quiet); a failed or mismatching download leaves
    nothing behind.

    HTTP 404 or a missing file:// -> FileNotFoundError; 401/403 -> ValueError naming HF_TOKEN; a sha256 mismatch ->
    ValueError; other network failures -> ConnectionError."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "nanoCEP", **(headers or {})})
    if not quiet:
        print(f"downloading {url} -> {dest}", file=sys.stderr)
    with atomic_open(dest, "wb") as f:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(request) as r:
                while chunk := r.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"not found: {url}") from None
            if e.code in (401, 403):
                raise ValueError(f"{url}: access denied (HTTP {e.code}); for a gated repo accept its terms on the "
                                 "Hub and set HF_TOKEN") from None
            raise ConnectionError(f"could not download {url} (HTTP {e.code})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, FileNotFoundError):       # file:// to a missing file
                raise FileNotFoundError(f"not found: {url}") from None
            raise ConnectionError(f"could not download {url} ({reason}); pass a local path instead") from None
        if sha256 and digest.hexdigest() != sha256.lower():
            raise ValueError(f"sha256 mismatch for {url}: got {digest.hexdigest()}, expected {sha256}")
    return dest
