"""Where a search's experiment lives: a local folder or a remote URI (s3://, gs://, with query options), Ray
Tune's storage arguments for it, and copies between the remote experiment and the driver's local mirror."""
from __future__ import annotations

from pathlib import Path

from kron.errors import ConfigError

from .config import SearchConfig, is_remote_storage

__all__ = ["download", "download_file", "experiment_path", "local_experiment_dir", "local_mirror", "remote_experiment_exists", "storage_args", "upload"]


def experiment_path(cfg: SearchConfig) -> str:
    """`<storage>/<name>` (a local path or a URI; a URI's query, e.g. `?endpoint_override=host:9000&scheme=http`
    for MinIO or Ceph, stays at the end)."""
    storage, sep, query = cfg.search.storage.partition("?")
    return f"{storage.rstrip('/')}/{cfg.name}{sep}{query}"


def storage_args(uri: str) -> dict:
    """Ray Tune's storage arguments for a local path or a URI. A URI is resolved to a pyarrow filesystem here, so
    that its query options (endpoint, scheme, region) reach every reader and writer, Ray's included."""
    if not is_remote_storage(uri):
        return {"storage_path": uri}
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return {"storage_path": path, "storage_filesystem": fs}


def local_experiment_dir(cfg: SearchConfig) -> Path:
    """Where this driver keeps the experiment: the folder itself, or for remote storage its local mirror."""
    return Path(experiment_path(cfg)) if not is_remote_storage(cfg.search.storage) else local_mirror(cfg)


def local_mirror(cfg: SearchConfig) -> Path:
    """The driver's local copy of a remote experiment, for the analysis: ./kronsearch_results/<name>."""
    return Path("kronsearch_results") / cfg.name


def remote_experiment_exists(uri: str) -> bool:
    """Whether Ray's experiment state is already under a remote experiment URI (checked before Ray starts)."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"storage {uri!r} cannot be read: {exc}") from None
    return any(Path(i.path).name.startswith("experiment_state-") for i in infos)


def upload(local_dir: Path, uri: str, patterns: list[str]) -> None:
    """Copy the local files matching `patterns` (relative to local_dir) to the same places under a remote URI."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    for pattern in patterns:
        for path in sorted(local_dir.glob(pattern)):
            if path.is_file():
                with fs.open_output_stream(f"{root}/{path.relative_to(local_dir).as_posix()}") as out:
                    out.write(path.read_bytes())


def download(uri: str, local_dir: Path) -> None:
    """Copy a remote experiment (s3://, gs://, ...) to a local folder for the analysis."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(root, str(local_dir.resolve()), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


def download_file(uri: str, name: str, local_dir: Path) -> bool:
    """Copy one file `name` of a remote experiment into local_dir; False when the experiment has none."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    try:
        if fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.File:
            return False
        with fs.open_input_file(f"{root}/{name}") as src:
            (Path(local_dir) / name).write_bytes(src.read())
    except OSError:
        return False
    return True
