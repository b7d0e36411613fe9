"""Make sdists reproducible: each is rewritten in place (`make wheels` runs this).

  python3 deploy/normalize-sdist.py EPOCH SDIST...

setuptools packs an sdist's files with the modification times, owners and modes they have in
the checkout, dates the files it generates (PKG-INFO, the egg-info) and the gzip header with
the time of the build, so two builds of one commit differ. Rewritten: members in name order,
dated EPOCH (SOURCE_DATE_EPOCH: the commit's time), owned by 0:0 without names, mode 0755 for
folders and executables and 0644 for the rest, in a gzip stream dated EPOCH without a file
name. What the files hold is not touched. (The wheel needs none of this: setuptools dates its
members SOURCE_DATE_EPOCH and orders them itself.)
"""

import gzip
import io
import os
import sys
import tarfile
from pathlib import Path


def normalize(path: Path, epoch: int) -> None:
    """Rewrite the sdist at `path` as described above."""
    members = []
    with tarfile.open(path, "r:gz") as source:
        for info in source.getmembers():
            if not (info.isfile() or info.isdir()):
                sys.exit(f"normalize-sdist.py: {path}: {info.name} is neither file nor folder")
            file = source.extractfile(info)  # None for a folder
            members.append((info, None if file is None else file.read()))
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as target:
        for info, data in sorted(members, key=lambda member: member[0].name):
            info.mtime = epoch
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
            info.pax_headers = {}
            target.addfile(info, None if data is None else io.BytesIO(data))
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file, gzip.GzipFile("", "wb", 9, file, mtime=epoch) as stream:
        stream.write(packed.getvalue())
    os.replace(temporary, path)


if __name__ == "__main__":
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit(__doc__)
    for name in sys.argv[2:]:
        normalize(Path(name), int(sys.argv[1]))
