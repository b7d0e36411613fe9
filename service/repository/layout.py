"""Read a model repository laid out as Triton lays it out.

<repository>/<model>/config.pbtxt
<repository>/<model>/<version>/model.onnx
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from rnnserve._pb import model_config_pb2 as mc
from rnnserve.errors import InvalidModelRepository

CONFIG_FILE = "config.pbtxt"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ModelEntry:
    """One model folder of the repository: its config (named after the folder), its versions
    and its path."""

    name: str
    config: mc.ModelConfig
    versions: tuple[int, ...]
    """Version folders holding a model file, ascending."""
    path: Path

    @property
    def streamable(self) -> bool:
        """Whether the config has sequence_batching: the server carries its state."""
        return self.config.HasField("sequence_batching")

    def model_file(self, version: int) -> Path:
        """<path>/<version>/<default_model_filename, or model.onnx>."""
        return self.path / str(version) / (self.config.default_model_filename or MODEL_FILE)


def read_config(path: Path) -> mc.ModelConfig:
    """The ModelConfig in a config.pbtxt (protobuf text format).

    Raises InvalidModelRepository when it cannot be read or does not parse.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidModelRepository(
            f"{path}: cannot read the model configuration: {error}"
        ) from error
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as error:
        raise InvalidModelRepository(f"{path}: not a valid model configuration: {error}") from error


def scan(repository: Path) -> list[ModelEntry]:
    """Every model folder with a config.pbtxt, sorted by name.

    Raises InvalidModelRepository when the repository is not a directory, or a config cannot
    be read or names another model.
    """
    return [_entry(repository / name) for name in folders(repository)]


def folders(repository: Path) -> list[str]:
    """The names of the model folders (those with a config.pbtxt), sorted, none of them read.
    Raises InvalidModelRepository when the repository is not a directory."""
    _check_is_directory(repository)
    return sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILE).is_file())


def find(repository: Path, name: str) -> ModelEntry | None:
    """The model folder `name` as it is on disk now; None when there is none (no folder, or
    one without a config.pbtxt). Raises what `scan` raises, for that folder alone."""
    folder = model_folder(repository, name)
    return _entry(folder) if folder is not None else None


def model_folder(repository: Path, name: str) -> Path | None:
    """The folder of model `name` when it has a config.pbtxt (not read); else None. Raises
    InvalidModelRepository when the repository is not a directory."""
    _check_is_directory(repository)
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return None  # not a folder name (a client may send anything)
    folder = repository / name
    try:
        return folder if (folder / CONFIG_FILE).is_file() else None
    except OSError:  # a name too long for the file system
        return None


def _check_is_directory(repository: Path) -> None:
    if not repository.is_dir():
        raise InvalidModelRepository(f"model repository {repository} is not a directory")


def _entry(folder: Path) -> ModelEntry:
    config = read_config(folder / CONFIG_FILE)
    if config.name and config.name != folder.name:
        raise InvalidModelRepository(
            f"{folder / CONFIG_FILE}: name {config.name!r} differs from its folder {folder.name!r}"
        )
    config.name = folder.name
    filename = config.default_model_filename or MODEL_FILE
    versions = tuple(
        sorted(
            int(p.name)
            for p in folder.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / filename).is_file()
        )
    )
    return ModelEntry(folder.name, config, versions, folder)
