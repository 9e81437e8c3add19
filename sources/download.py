"""
Downloads checked by sha256, for the instruments that fetch released files (autoencoders, DiT / LDM checkpoints,
Inception): atomic, so a failed or mismatching download leaves nothing behind, and every failure one clear error.
Every downloader in nanoCEP also takes a local path, so nothing here runs on an offline machine.

Files on the Hugging Face Hub (a repo id, or a huggingface.co/REPO/resolve/REVISION/FILE URL) come through
huggingface_hub (hub_file), into its shared cache (HF_HOME / HF_HUB_CACHE, where diffusers and transformers look too):
a cached branch is revalidated against the Hub, HF_HUB_OFFLINE=1 serves the cache without touching the network,
HF_TOKEN opens gated repos and HF_ENDPOINT picks a mirror. Other URLs (GitHub releases, Inception, ...) use download.

Nothing to run here; weights/ and scoring/ import it (it sits in sources/, the core, so those instruments need no
arrow to each other).
"""
import hashlib
import re
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


HUB_URL = re.compile(r"https://huggingface\.co/([\w.-]+/[\w.-]+)/resolve/([^/]+)/(.+)")


def hub_location(url: str) -> tuple[str, str, str] | None:
    """(repo_id, revision, filename) of a https://huggingface.co/REPO/resolve/REVISION/FILE URL, else None."""
    m = HUB_URL.fullmatch(url)
    return (m[1], m[2], m[3]) if m else None


def hub_file(repo_id: str, filename: str, revision: str = "main", cache_dir=None, sha256: str | None = None) -> Path:
    """The local path of one file of a Hub repo, fetched by huggingface_hub.hf_hub_download into its cache (cache_dir
    when given, else HF_HUB_CACHE), checked against sha256 when given. A missing repo, revision or file ->
    FileNotFoundError; a gated or private repo -> ValueError naming HF_TOKEN; neither cached nor reachable ->
    ConnectionError."""
    import huggingface_hub
    from huggingface_hub import errors
    where = f"{repo_id}@{revision}: {filename}"
    try:
        path = Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
    except errors.GatedRepoError:
        raise ValueError(f"{repo_id}: access denied (gated); accept its terms on the Hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id}: no such repo on the Hub (a private one needs HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id}: no revision {revision!r} on the Hub") from None
    except errors.RemoteEntryNotFoundError:
        raise FileNotFoundError(f"not found: {where}") from None
    except errors.LocalEntryNotFoundError:           # offline (HF_HUB_OFFLINE=1) or unreachable, and not cached
        offline = " (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        raise ConnectionError(f"{where} is not in the Hugging Face cache and the Hub cannot be reached{offline}; "
                              f"pass a local path instead") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise ConnectionError(f"could not download {where} ({str(e).splitlines()[0][:200]})") from None
    if sha256 and file_hash(path) != sha256.lower():
        raise ValueError(f"sha256 mismatch for {where}: got {file_hash(path)}, expected {sha256}")
    return path
