"""Set rnnserve's version in every file that names it: `make version VERSION=X.Y.Z`.

  python3 deploy/set-version.py X.Y.Z [ROOT]

The version is defined once, in pyproject.toml's [project].version: the wheel, `rnnserve
--version`, the server's start line and the images' tags and label all read it from there.
The files below cannot read it, so each carries a copy that this script rewrites with it:

- deploy/helm/rnnserve/Chart.yaml: appVersion (the image tag the chart deploys) and version
  (the chart is released with the server, under the same number);
- deploy/kserve/servingruntime.yaml: the runtime's image;
- deploy/kustomize/overlays/gpu/kustomization.yaml: the GPU image's tag (X.Y.Z-gpu);
- deploy/kustomize/base/kustomization.yaml: the tag in its example of an overlay;
- native/Cargo.toml and native/Cargo.lock: the native transport's crate (its wheel,
  rnnserve-native, is released beside rnnserve's, under the same number);
- CHANGELOG.md: the Unreleased section's entries become X.Y.Z's, dated today (UTC), under a
  new, empty Unreleased section.

deploy/kustomize/base/rnnserve.yaml is the chart's render, not edited here: `make version`
renders it again (`make manifests`). tests/test_version.py fails when any copy disagrees.
Only X.Y.Z is taken: PEP 440 (the wheel) and SemVer (Helm) spell it the same, so one string
serves everywhere, whereas a pre-release would be 1.0.0rc1 in one and 1.0.0-rc.1 in the other.
"""

import datetime
import re
import sys
import tomllib
from pathlib import Path

EDITS = (
    ("pyproject.toml", r'(?ms)^\[project\]\n.*?^version = "([^"]+)"$'),
    ("deploy/helm/rnnserve/Chart.yaml", r"(?m)^version: (\S+)$"),
    ("deploy/helm/rnnserve/Chart.yaml", r'(?m)^appVersion: "([^"]+)"$'),
    ("deploy/kserve/servingruntime.yaml", r"(?m)^\s+image: rnnserve:(\S+)$"),
    ("deploy/kustomize/overlays/gpu/kustomization.yaml", r"(?m)^\s+newTag: (\S+)-gpu$"),
    ("deploy/kustomize/base/kustomization.yaml", r"(?m)^#.*newTag: ([^}\s]+)\}"),
    ("native/Cargo.toml", r'(?ms)^\[package\]\n.*?^version = "([^"]+)"$'),
    ("native/Cargo.lock", r'(?m)^name = "rnnserve-native"\nversion = "([^"]+)"$'),
)
"""Each file and a pattern matching the one place in it that holds the version (group 1)."""
RELEASE = re.compile(r"\d+\.\d+\.\d+")
UNRELEASED = "## [Unreleased]\n"


def set_version(root: Path, version: str, today: datetime.date) -> None:
    """Write `version` into each of EDITS under `root` and date CHANGELOG.md's Unreleased
    entries with it; nothing is written unless every file has its one place to change."""
    texts = {name: (root / name).read_text() for name, _ in EDITS}
    for name, pattern in EDITS:
        matches = list(re.finditer(pattern, texts[name]))
        if len(matches) != 1:
            sys.exit(f"set-version.py: {name}: {len(matches)} matches of {pattern!r}, not 1")
        start, end = matches[0].span(1)
        texts[name] = texts[name][:start] + version + texts[name][end:]
    changelog = (root / "CHANGELOG.md").read_text()
    if changelog.count(UNRELEASED) != 1:
        sys.exit(f"set-version.py: CHANGELOG.md has no single {UNRELEASED.strip()!r} heading")
    if f"## [{version}]" in changelog:
        sys.exit(f"set-version.py: CHANGELOG.md has a section for {version} already")
    texts["CHANGELOG.md"] = changelog.replace(
        UNRELEASED, f"{UNRELEASED}\n## [{version}] - {today.isoformat()}\n"
    )
    for name, text in texts.items():
        (root / name).write_text(text)


def main(argv: list[str]) -> None:
    """The command: check the arguments, then set the version."""
    if len(argv) not in (1, 2) or not RELEASE.fullmatch(argv[0]):
        sys.exit(__doc__)
    version, root = argv[0], Path(argv[1] if len(argv) == 2 else ".")
    with (root / "pyproject.toml").open("rb") as file:
        current = tomllib.load(file)["project"]["version"]
    if version == current:
        sys.exit(f"set-version.py: the version is {version} already")
    set_version(root, version, datetime.datetime.now(datetime.UTC).date())
    sys.stdout.write(f"rnnserve {current} -> {version}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
