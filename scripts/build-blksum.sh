#!/usr/bin/env bash
# Builds blksum, the command-line tool of blkhash
# (https://github.com/nirs/blkhash, LGPL-2.1-or-later), at version 0.11,
# and installs it under DESTDIR: the program is DESTDIR/bin/blksum, linked
# statically with libblkhash, so it runs from there. nbd-bench's blkhash
# row measures `nbd-copy --blkhash` against it:
#
#   scripts/build-blksum.sh ~/blksum
#   cargo run --release -p nbd-tests --bin nbd-bench -- --blkhash-only --blksum ~/blksum/bin/blksum
#
# blksum is not packaged in Debian; this takes the tagged source from GitHub
# (git clone, or the release tarball when git cannot), leaves out its test/
# subdirectory (whose build downloads the Unity test framework), and builds
# it with meson and ninja. Idempotent: does nothing when DESTDIR/bin/blksum
# is already there; installs the missing build dependencies with apt
# (meson, ninja-build, gcc, pkg-config, libssl-dev, libnbd-dev).
#
# Environment:
#   BLKHASH_TAG     the tag to build (default: tries v0.11.0, then v0.11)
#   BLKHASH_SOURCE  a blkhash source tree, git repository or tarball to
#                   build instead of downloading (for machines that cannot
#                   reach GitHub); a git repository is checked out at the
#                   tag when it has it, else at its HEAD
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    echo "usage: $0 DESTDIR   (installs DESTDIR/bin/blksum)" >&2
    exit 2
fi
mkdir -p "$1"
dest=$(cd "$1" && pwd)
if [[ -x $dest/bin/blksum ]]; then
    echo "build-blksum: $dest/bin/blksum present"
    exit 0
fi

read -r -a tags <<<"${BLKHASH_TAG:-v0.11.0 v0.11}"
repo=https://github.com/nirs/blkhash

sudo=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
fi

# Build dependencies: each command or pkg-config module and its Debian
# package.
missing_packages() {
    command -v meson >/dev/null 2>&1 || echo meson
    command -v ninja >/dev/null 2>&1 || echo ninja-build
    command -v cc >/dev/null 2>&1 || echo gcc
    command -v pkg-config >/dev/null 2>&1 || echo pkg-config
    if command -v pkg-config >/dev/null 2>&1; then
        pkg-config --exists openssl || echo libssl-dev
        pkg-config --exists libnbd || echo libnbd-dev
    else
        echo libssl-dev
        echo libnbd-dev
    fi
    if [[ -z ${BLKHASH_SOURCE:-} ]]; then
        command -v git >/dev/null 2>&1 || echo git
        command -v curl >/dev/null 2>&1 || echo curl
    fi
}

mapfile -t packages < <(missing_packages | sort -u)
if ((${#packages[@]} != 0)); then
    echo "build-blksum: installing ${packages[*]}"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "build-blksum: apt-get not found; install ${packages[*]} (or equivalents) by hand" >&2
        exit 1
    fi
    if [[ $(id -u) -ne 0 && ${#sudo[@]} -eq 0 ]]; then
        echo "build-blksum: not root and sudo not found; cannot install ${packages[*]}" >&2
        exit 1
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
    mapfile -t packages < <(missing_packages | sort -u)
    if ((${#packages[@]} != 0)); then
        echo "build-blksum: still missing after installation: ${packages[*]}" >&2
        exit 1
    fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/blkhash

# Unpacks a tarball into $src (its one top directory stripped).
unpack() {
    mkdir -p "$src"
    tar -xf "$1" -C "$src" --strip-components=1
}

fetched=false
if [[ -n ${BLKHASH_SOURCE:-} ]]; then
    if [[ -f $BLKHASH_SOURCE ]]; then
        unpack "$BLKHASH_SOURCE"
    elif git -C "$BLKHASH_SOURCE" rev-parse --git-dir >/dev/null 2>&1; then
        ref=HEAD
        for tag in "${tags[@]}"; do
            if git -C "$BLKHASH_SOURCE" rev-parse -q --verify "refs/tags/$tag" >/dev/null; then
                ref=$tag
                break
            fi
        done
        echo "build-blksum: building $ref of $BLKHASH_SOURCE"
        mkdir -p "$src"
        git -C "$BLKHASH_SOURCE" archive "$ref" | tar -x -C "$src"
    elif [[ -d $BLKHASH_SOURCE ]]; then
        cp -a "$BLKHASH_SOURCE" "$src"
    else
        echo "build-blksum: BLKHASH_SOURCE=$BLKHASH_SOURCE is not a directory or a file" >&2
        exit 1
    fi
    fetched=true
else
    for tag in "${tags[@]}"; do
        echo "build-blksum: fetching $repo at $tag"
        if git clone -q --depth 1 --branch "$tag" "$repo" "$src" 2>"$work/git.log"; then
            fetched=true
            break
        fi
        rm -rf "$src"
        if curl -fsSL --retry 3 -o "$work/blkhash.tar.gz" "$repo/archive/refs/tags/$tag.tar.gz" 2>"$work/curl.log"; then
            unpack "$work/blkhash.tar.gz"
            fetched=true
            break
        fi
    done
fi
if ! $fetched; then
    echo "build-blksum: cannot fetch $repo at ${tags[*]}:" >&2
    cat "$work/git.log" "$work/curl.log" >&2 2>/dev/null || true
    echo "build-blksum: on a machine without GitHub, set BLKHASH_SOURCE to a copy of the source" >&2
    exit 1
fi

# Leave out the tests: their build fetches Unity (a meson wrap).
if [[ ! -f $src/meson.build ]]; then
    echo "build-blksum: no meson.build in the blkhash source" >&2
    exit 1
fi
sed -i -e "s/^subdir('test')/# subdir('test')/" "$src/meson.build"
rm -rf "$src/test"

meson setup "$work/build" "$src" \
    --prefix="$dest" \
    --default-library=static \
    --wrap-mode=nodownload \
    -Dnbd=enabled \
    -Dman=disabled \
    -Dblake3=disabled
ninja -C "$work/build"
ninja -C "$work/build" install
"$dest/bin/blksum" --list-digests >/dev/null
echo "build-blksum: installed $dest/bin/blksum"
