#!/usr/bin/env bash
# Install Triton's C++ load generator `perf_analyzer` into PREFIX (default build/perf_analyzer).
#
#   bash install_perf_analyzer.sh [PREFIX]
#
# Result:
#   PREFIX/libexec/perf_analyzer   real binary, from the tritonclient==2.48.0 manylinux1_x86_64 wheel
#                                  (newer tritonclient wheels need a newer glibc than Debian bookworm's 2.36)
#   PREFIX/lib/libcudart.so.12     from the nvidia-cuda-runtime-cu12 wheel (only dlopen-free NEEDED dep; no GPU needed)
#   PREFIX/bin/perf_analyzer       wrapper that sets LD_LIBRARY_PATH and execs the real binary
#   libb64.so.0d                   from Debian's libb64-0d (apt-get, needs root)
# Only the system python3's pip is used, as a *downloader* (pip download --no-deps); nothing is
# installed into any Python environment. Idempotent: a second run is a no-op.
set -euo pipefail

PREFIX="${1:-${PREFIX:-build/perf_analyzer}}"
PYTHON="${PYTHON:-python3}"
TC_VER=2.48.0
TC_WHL="tritonclient-${TC_VER}-py3-none-manylinux1_x86_64.whl"
TC_SHA=7074885798e8a711fedaf94d6dd77f310973fe2ebf29fb2837db350a43e2d6a5
CR_VER=12.5.82
CR_WHL="nvidia_cuda_runtime_cu12-${CR_VER}-py3-none-manylinux2014_x86_64.whl"
CR_SHA=3e79a060e126df40fd3a068f3f787eb000fa51b251ec6cd97d09579632687115

mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
STAMP="$PREFIX/.installed-${TC_VER}-${CR_VER}"

# 1. libb64.so.0d (Debian package libb64-0d)
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: libb64-0d missing; run as root: apt-get update && apt-get install -y libb64-0d" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends libb64-0d >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends libb64-0d >/dev/null; }
fi

# 2. wheels -> binary + libcudart.so.12
if [ ! -f "$STAMP" ]; then
  DL="$PREFIX/.dl"
  mkdir -p "$DL" "$PREFIX/bin" "$PREFIX/lib" "$PREFIX/libexec"
  for spec in "tritonclient==$TC_VER $TC_WHL $TC_SHA" "nvidia-cuda-runtime-cu12==$CR_VER $CR_WHL $CR_SHA"; do
    set -- $spec
    if ! echo "$3  $DL/$2" | sha256sum -c --status 2>/dev/null; then
      rm -f "$DL/$2"
      PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
        --platform manylinux1_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --python-version 3.11 --implementation py -d "$DL" "$1"
      echo "$3  $DL/$2" | sha256sum -c --status || { echo "error: sha256 mismatch for $2" >&2; exit 1; }
    fi
  done
  "$PYTHON" - "$DL/$TC_WHL" "$DL/$CR_WHL" "$PREFIX" <<'EOF'
import os, shutil, sys, zipfile
tc, cr, prefix = sys.argv[1:4]
for whl, member, dest in (
    (tc, "tritonclient-2.48.0.data/data/bin/perf_analyzer", "libexec/perf_analyzer"),
    (cr, "nvidia/cuda_runtime/lib/libcudart.so.12", "lib/libcudart.so.12"),
):
    dest = os.path.join(prefix, dest)
    with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".tmp", "wb") as out:
        shutil.copyfileobj(src, out)
    os.chmod(dest + ".tmp", 0o755)
    os.replace(dest + ".tmp", dest)
EOF
  cat > "$PREFIX/bin/perf_analyzer" <<'EOF'
#!/bin/sh
d="$(cd "$(dirname "$0")/.." && pwd)"
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/libexec/perf_analyzer" "$@"
EOF
  chmod 755 "$PREFIX/bin/perf_analyzer"
  # 3. check every NEEDED lib resolves and the binary runs
  if LD_LIBRARY_PATH="$PREFIX/lib" ldd "$PREFIX/libexec/perf_analyzer" | grep -q 'not found'; then
    LD_LIBRARY_PATH="$PREFIX/lib" ldd "$PREFIX/libexec/perf_analyzer" >&2; exit 1
  fi
  "$PREFIX/bin/perf_analyzer" --version >/dev/null
  touch "$STAMP"
fi

echo "perf_analyzer installed: $PREFIX/bin/perf_analyzer (wrapper)"
echo "or run the binary directly with: LD_LIBRARY_PATH=$PREFIX/lib $PREFIX/libexec/perf_analyzer"
