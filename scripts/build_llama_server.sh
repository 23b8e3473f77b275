#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from source, statically, into a cache directory.
#
# The llama.cpp tree comes from the `llama-cpp-python` source distribution on the package index
# (it vendors llama.cpp under vendor/llama.cpp), fetched with pip. Only the `llama-server` target
# is built (Release, static libraries, no curl or OpenSSL, no host-specific CPU flags), so the
# binary needs only the C and C++ runtimes and moves between machines of the same architecture.
#
#   scripts/build_llama_server.sh            build when missing, print the binary's path
#   SPECPROXY_LLAMA_DIR=DIR scripts/...      use DIR instead of the default cache directory
#   SPECPROXY_LLAMA_JOBS=N                   parallel compile jobs (default 2)
#
# Layout of the cache directory:
#   bin/llama-server     the binary the tests and `python -m bench engine` use
#   src/llama.cpp/       the unpacked tree (its models/ holds the vocabulary files)
#   VERSION              the llama-cpp-python version the tree came from
# Needs cmake and a C++ compiler (Debian: cmake, g++); installed with apt-get when running as
# root and missing. About 10 minutes on 2 cores; skipped when bin/llama-server exists.
set -euo pipefail

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}"
dir="${SPECPROXY_LLAMA_DIR:-$cache_root/specproxy/llama}"
jobs="${SPECPROXY_LLAMA_JOBS:-2}"
bin="$dir/bin/llama-server"
python="${PYTHON:-python3}"

log() { echo "build_llama_server: $*" >&2; }

if [ -x "$bin" ] && [ -d "$dir/src/llama.cpp/models" ]; then
  log "already built: $bin"
  echo "$bin"
  exit 0
fi

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
if [ "${#need[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    log "missing ${need[*]} (install them, e.g. apt-get install cmake g++ make)"
    exit 1
  fi
fi

mkdir -p "$dir/src" "$dir/bin"
work="$(mktemp -d "$dir/.work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [ ! -d "$dir/src/llama.cpp/models" ]; then
  log "fetching the llama-cpp-python source distribution"
  "$python" -m pip download -q --no-deps --no-binary :all: --dest "$work/sdist" llama-cpp-python
  sdist="$(ls "$work"/sdist/llama_cpp_python-*.tar.gz | head -1)"
  version="$(basename "$sdist" .tar.gz)"
  version="${version#llama_cpp_python-}"
  log "unpacking $(basename "$sdist")"
  tar -xzf "$sdist" -C "$work"
  tree="$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp | head -1)"
  rm -rf "$dir/src/llama.cpp"
  mv "$tree" "$dir/src/llama.cpp"
  echo "$version" >"$dir/VERSION"
fi

src="$dir/src/llama.cpp"
build="$dir/build"
log "configuring (static, Release) in $build"
cmake -S "$src" -B "$build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF \
  -DGGML_OPENMP=OFF \
  -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON \
  >"$dir/cmake-configure.log" 2>&1 || { tail -30 "$dir/cmake-configure.log" >&2; exit 1; }
log "building llama-server with -j$jobs (about 10 minutes on 2 cores; log: $dir/cmake-build.log)"
cmake --build "$build" --config Release --target llama-server -j "$jobs" \
  >"$dir/cmake-build.log" 2>&1 || { tail -30 "$dir/cmake-build.log" >&2; exit 1; }
cp "$build/bin/llama-server" "$bin.tmp"
mv "$bin.tmp" "$bin"
rm -rf "$build"
log "built $bin ($(cat "$dir/VERSION"))"
echo "$bin"
