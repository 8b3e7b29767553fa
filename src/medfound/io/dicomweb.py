"""DICOMweb sources and destinations: ``dicomweb+http(s)://HOST[:PORT]/PREFIX/studies/UID[/series/UID]``.

A study or series is fetched (WADO-RS, through ``dicomweb-client``) into a local cache, one folder per
SeriesInstanceUID, and from there read by the same code as a local DICOM folder (slices sorted by
position). A series folder appears whole or not at all: instances are written into a hidden staging
folder, counted against what QIDO-RS says the series holds, and only then renamed into place, so a
cut connection never leaves a half series that a later run would trust. Results go back by STOW-RS.

Credentials never come from the command line (they would land in shell histories and ``ps``):
``MEDFOUND_DICOMWEB_TOKEN`` (a bearer token), or ``MEDFOUND_DICOMWEB_USER`` with
``MEDFOUND_DICOMWEB_PASSWORD``, or the netrc file (``$NETRC`` or ``~/.netrc``) entry for the host.
The cache is ``$MEDFOUND_CACHE/dicomweb`` (default ``~/.cache/medfound/dicomweb``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from medfound.errors import InputError

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
#: a finished series folder holds this file (its instance count); folders without it are never read
COMPLETE = ".complete"
SERIES_UID, STUDY_UID, MODALITY = "0020000E", "0020000D", "00080060"
N_INSTANCES, SERIES_DESCRIPTION = "00201209", "0008103E"
#: modalities of series that are results or documents, not images to read or segment
NOT_IMAGES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "DOC", "REG", "FID"})


def is_dicomweb(source: object) -> bool:
    """Whether ``source`` names a DICOMweb resource. A ``pathlib.Path`` made of such a URL has lost one
    slash of ``//`` (the CLI's path options do that), which is put back by :func:`parse`."""
    text = str(source)
    return text.startswith(SCHEMES) or text.startswith(("dicomweb+http:/", "dicomweb+https:/"))


@dataclass(frozen=True)
class DicomwebRef:
    """A parsed DICOMweb source: the service root, and optionally a study, a series and QIDO filters."""

    url: str  # as the user wrote it (scheme ``dicomweb+http``), for messages
    base: str  # http(s)://HOST:PORT/PREFIX: the DICOMweb service root
    study: str | None = None
    series: str | None = None
    query: tuple[tuple[str, str], ...] = ()

    @property
    def host(self) -> str:
        return urlsplit(self.base).hostname or ""


def parse(source: str | os.PathLike) -> DicomwebRef:
    """``dicomweb+http://h:p/dicom-web/studies/S/series/R?Modality=MR`` -> :class:`DicomwebRef`."""
    text = str(source)
    for scheme in ("dicomweb+http:/", "dicomweb+https:/"):
        if text.startswith(scheme) and not text.startswith(scheme + "/"):
            text = scheme + "/" + text[len(scheme):]  # a Path swallowed one slash of '//'
    if not text.startswith(SCHEMES):
        raise InputError(source, "not a DICOMweb address (dicomweb+http://HOST:PORT/PREFIX/studies/UID[/series/UID])")
    parts = urlsplit(text[len("dicomweb+"):])
    if parts.username or parts.password:
        raise InputError(_redacted(text), "credentials in the address are refused (they would be kept in shell "
                                          "histories); set MEDFOUND_DICOMWEB_USER / MEDFOUND_DICOMWEB_PASSWORD, "
                                          "MEDFOUND_DICOMWEB_TOKEN or a netrc entry for the host")
    if not parts.hostname:
        raise InputError(text, "the address names no host")
    words = [w for w in parts.path.split("/") if w]
    study = series = None
    if "studies" in words:
        i = words.index("studies")
        prefix, rest = words[:i], words[i + 1:]
        if not rest:
            raise InputError(text, "'studies/' must be followed by a StudyInstanceUID")
        study, rest = rest[0], rest[1:]
        if rest[:1] == ["series"]:
            if len(rest) < 2:
                raise InputError(text, "'series/' must be followed by a SeriesInstanceUID")
            series, rest = rest[1], rest[2:]
        if rest:
            raise InputError(text, f"unexpected '/{'/'.join(rest)}' after the UIDs")
    else:
        prefix = words
    base = f"{parts.scheme}://{parts.netloc}" + ("/" + "/".join(prefix) if prefix else "")
    return DicomwebRef(text, base, study, series, tuple(parse_qsl(parts.query)))


def _redacted(text: str) -> str:
    parts = urlsplit(text.replace("dicomweb+", "", 1))
    host = parts.hostname or ""
    return f"dicomweb+{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def credentials(host: str) -> tuple[str, str] | str | None:
    """(user, password), a bearer token, or None (anonymous), from the environment or netrc."""
    token = os.environ.get("MEDFOUND_DICOMWEB_TOKEN")
    if token:
        return token
    user = os.environ.get("MEDFOUND_DICOMWEB_USER")
    if user is not None:
        return user, os.environ.get("MEDFOUND_DICOMWEB_PASSWORD", "")
    import netrc

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if os.path.isfile(path):
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError) as e:
            raise InputError(path, f"unreadable netrc file: {e}") from None
        if entry:
            return entry[0] or "", entry[2] or ""
    return None


def client(ref: DicomwebRef):
    """A ``dicomweb_client.DICOMwebClient`` for ``ref``'s service, with its credentials, no retries
    (a failure is reported at once, with the URL), and certificates from the system or ``REQUESTS_CA_BUNDLE``."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    session.trust_env = False  # netrc is read above for this host only; proxies from the environment still apply
    session.proxies = requests.utils.get_environ_proxies(ref.base)
    if os.environ.get("REQUESTS_CA_BUNDLE"):
        session.verify = os.environ["REQUESTS_CA_BUNDLE"]
    auth = credentials(ref.host)
    headers = {}
    if isinstance(auth, str):
        headers["Authorization"] = f"Bearer {auth}"
    elif auth is not None:
        session.auth = auth
    web = DICOMwebClient(ref.base, session=session, headers=headers, timeout=(10, 120))
    web.set_http_retry_params(retry=False)
    return web


@contextlib.contextmanager
def reported(url: str, doing: str) -> Iterator[None]:
    """Turn what the network and the server can do wrong into one :class:`InputError` naming ``url``."""
    import requests
    from pydicom.errors import InvalidDicomError

    try:
        yield
    except InputError:
        raise
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else 0
        if code in (401, 403):
            why = (f"the server refused the credentials (HTTP {code}) while {doing}; set MEDFOUND_DICOMWEB_USER / "
                   "MEDFOUND_DICOMWEB_PASSWORD, MEDFOUND_DICOMWEB_TOKEN or a netrc entry for the host")
        elif code == 404:
            why = f"not found on the server (HTTP 404) while {doing}: check the UIDs and the service prefix"
        else:
            why = f"the server answered HTTP {code} while {doing}"
        raise InputError(url, why) from None
    except requests.Timeout:
        raise InputError(url, f"the server did not answer in time while {doing}") from None
    except requests.exceptions.SSLError:
        raise InputError(url, f"the server's TLS certificate could not be verified while {doing}; give its CA "
                              "certificate in REQUESTS_CA_BUNDLE") from None
    except requests.exceptions.ChunkedEncodingError:
        raise InputError(url, f"the response was cut off (truncated) while {doing}; nothing was kept") from None
    except requests.ConnectionError as e:
        text = str(e)
        if "IncompleteRead" in text or "Connection broken" in text or "RemoteDisconnected" in text:
            raise InputError(url, f"the response was cut off (truncated) while {doing}; nothing was kept") from None
        raise InputError(url, f"cannot connect to the server while {doing} (is it running, and is the address right?)") from None
    except requests.RequestException as e:
        raise InputError(url, f"request failed while {doing}: {type(e).__name__}") from None
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as e:
        raise InputError(url, f"malformed or truncated response while {doing}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}") from None


def _value(item: dict, tag: str, default: str = "") -> str:
    values = item.get(tag, {}).get("Value") or [default]
    return str(values[0])


@dataclass(frozen=True)
class RemoteSeries:
    """One series found by QIDO-RS: where it is and what it holds."""

    study: str
    series: str
    modality: str = ""
    description: str = ""
    instances: int | None = None

    def url(self, ref: DicomwebRef) -> str:
        scheme = ref.url.split("://", 1)[0]
        return f"{scheme}://{ref.base.split('://', 1)[1]}/studies/{self.study}/series/{self.series}"


def _series_of(item: dict, study: str | None = None) -> RemoteSeries:
    n = _value(item, N_INSTANCES)
    return RemoteSeries(study or _value(item, STUDY_UID), _value(item, SERIES_UID), _value(item, MODALITY),
                        _value(item, SERIES_DESCRIPTION), int(n) if n.isdigit() else None)


FIELDS = ("NumberOfSeriesRelatedInstances", "SeriesDescription", "Modality", "StudyInstanceUID")


def series_in(ref: DicomwebRef) -> list[RemoteSeries]:
    """The series ``ref`` names: the one series, every series of the study, or (no study) every series
    QIDO-RS finds with the address's query parameters."""
    web = client(ref)
    with reported(ref.url, "searching for series"):
        filters = dict(ref.query)
        if ref.series:
            filters["SeriesInstanceUID"] = ref.series
        found = web.search_for_series(study_instance_uid=ref.study, fields=list(FIELDS), search_filters=filters,
                                      get_remaining=True)
    series = [_series_of(item, ref.study) for item in found]
    if not series:
        what = "series" if ref.series else "study" if ref.study else "series matching the query"
        raise InputError(ref.url, f"no such {what} on the server" if ref.study else f"no {what} on the server")
    return sorted(series, key=lambda s: s.series)


def cache_root() -> Path:
    return Path(os.environ.get("MEDFOUND_CACHE") or Path.home() / ".cache" / "medfound") / "dicomweb"


def fetch_series(ref: DicomwebRef, remote: RemoteSeries, cache: Path | None = None) -> Path:
    """The local folder of ``remote``'s instances, fetched by WADO-RS unless the cache holds all of them."""
    cache = Path(cache or cache_root())
    folder = cache / remote.series
    marker = folder / COMPLETE
    if marker.is_file() and (remote.instances is None or marker.read_text().strip() == str(remote.instances)):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{remote.series}.", suffix=".partial", dir=cache))
    url = remote.url(ref)
    try:
        web = client(ref)
        n = 0
        with reported(url, "retrieving the series"):
            for ds in web.iter_series(remote.study, remote.series):
                name = str(ds.get("SOPInstanceUID", "")) or f"instance{n:05d}"
                ds.save_as(stage / f"{name}.dcm", enforce_file_format=True)
                n += 1
        if remote.instances is not None and n != remote.instances:
            raise InputError(url, f"the response was cut off (truncated): {n} of {remote.instances} instances "
                                  "arrived; nothing was kept")
        if n == 0:
            raise InputError(url, "the server sent no instances for this series")
        (stage / COMPLETE).write_text(f"{n}\n")
        _move_in(stage, folder, str(n))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def _move_in(stage: Path, folder: Path, count: str) -> None:
    """Rename a complete staged series onto ``folder``. Another process may have finished the same
    series meanwhile: a complete folder of the same count is kept (it may be being read), anything
    else there (stale or partial) is replaced."""
    for _ in range(3):
        try:
            os.rename(stage, folder)  # fails while ``folder`` exists and is not empty
            return
        except OSError:
            marker = folder / COMPLETE
            if marker.is_file() and marker.read_text().strip() == count:
                return
            shutil.rmtree(folder, ignore_errors=True)
    raise InputError(folder, "cannot move the fetched series into the cache")


def localise(source: str | os.PathLike, cache: Path | None = None,
             images_only: bool = False) -> list[tuple[str, Path, RemoteSeries]]:
    """(case name, local folder, remote series) for every series ``source`` names, fetched as needed;
    with ``images_only``, results and documents (DICOM-SEG, RTSTRUCT, reports) are passed over, so a
    study that holds earlier results is still segmented as its images. The case name is the
    SeriesInstanceUID: unique, and what a PACS user looks a result up by."""
    ref = parse(source)
    if not ref.study and not ref.query:
        raise InputError(ref.url, "name a study (/studies/UID), a series (/studies/UID/series/UID) or a QIDO query "
                                  "(?Modality=MR&StudyDate=...)")
    found = series_in(ref)
    if images_only:
        images = [s for s in found if s.modality not in NOT_IMAGES]
        if not images:
            kinds = ", ".join(sorted({s.modality for s in found}))
            raise InputError(ref.url, f"holds no image series (only {kinds}); give the address of an image series")
        found = images
    return [(s.series, fetch_series(ref, s, cache), s) for s in found]


def push(source: str | os.PathLike, written: Iterable[str | os.PathLike]) -> list[str]:
    """STOW-RS the DICOM objects among a result's ``written`` files (DICOM-SEG, RTSTRUCT) to the PACS
    ``source`` came from, one object at a time; returns their addresses."""
    from medfound.io.result_files import PACS_SUFFIXES

    ref = parse(source)
    return [store(ref, [f]) for f in written if str(f).endswith(PACS_SUFFIXES)]


def store(ref: DicomwebRef, files: Iterable[str | os.PathLike]) -> str:
    """STOW-RS ``files`` to ``ref``'s service; returns the address of the stored series."""
    import pydicom

    datasets = [pydicom.dcmread(str(f)) for f in files]
    if not datasets:
        return ""
    web = client(ref)
    with reported(ref.url, "storing the result (STOW-RS)"):
        web.store_instances(datasets)
    first = datasets[0]
    return RemoteSeries(str(first.StudyInstanceUID), str(first.SeriesInstanceUID)).url(ref)
