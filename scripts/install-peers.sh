#!/usr/bin/env bash
# Installs the real NBD peers the integration tests (crate nbd-tests) talk
# to.  Idempotent: does nothing when every peer command is already present.
#
#   command              Debian package
#   nbdkit               nbdkit
#   nbdinfo, nbdcopy     libnbd-bin
#   nbdsh                python3-libnbd
#   nbd-server           nbd-server
#   fio                  fio
#   fusermount           fuse (nbd-fuse mounts through it; tests/tests/fuse.rs)
#   nbdfuse              nbdfuse (nbd-bench's FUSE rows; Debian 12 ships it
#                        in libnbd-bin, later releases in its own package,
#                        installed when apt knows it)
#   qemu-img, qemu-nbd,  qemu-utils
#   qemu-io
#   nginx                nginx (the web server of the HTTP source tests,
#                        tests/tests/http_source.rs; in /usr/sbin)
#   openssl              openssl (makes the keys and certificates of the
#                        TLS key tests, tests/tests/tls_keys.rs)
#   ceph-mon             ceph-mon     (the throwaway cluster of the RBD
#   ceph-osd             ceph-osd      tests, scripts/ceph-cluster.sh)
#   ceph, rbd, rados     ceph-common
#   librbd.h, librbd.so  librbd-dev   (nbd-serve's cargo feature rbd)
#
# and one Python package, for the python3 first on PATH (the one the tests
# run), with pip (python3-pip, and gcc and python3-dev for its C part, when
# missing):
#
#   ovirt_imageio        ovirt-imageio (oVirt imageio's checksum, which
#                        nbd-copy --blkhash=imageio computes;
#                        tests/tests/blkhash.rs)
#
# With --bench it also installs qemu-block-extra (qemu-nbd's rbd driver,
# for nbd-bench's RBD rows, and qemu-img's curl driver, for its HTTP
# qcow2 row) at exactly the version of the installed
# qemu-utils; see install_qemu_rbd below.
set -euo pipefail

commands=(nbdkit nbdinfo nbdcopy nbdsh nbd-server fio fusermount nbdfuse qemu-img qemu-nbd qemu-io nginx openssl ceph-mon ceph-osd ceph rbd rados)
packages=(nbdkit libnbd-bin nbd-server fio fuse qemu-utils python3-libnbd nginx openssl ceph-mon ceph-osd ceph-common librbd-dev)
bench=false
[[ ${1:-} == --bench ]] && bench=true

# qemu-nbd serves rbd: images only with qemu-block-extra of its own
# version. Debian 12 machines may carry qemu-utils from bookworm-backports;
# a plain `apt-get install qemu-block-extra` would then pick bookworm's
# older one and replace qemu-utils with it. So: the exact version, from the
# backports suite (added if needed), and apt may remove nothing.
install_qemu_rbd() {
    local version
    version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) || {
        echo "install-peers: qemu-utils is not installed" >&2
        return 1
    }
    if [[ $(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null || true) == "$version" ]]; then
        echo "install-peers: qemu-block-extra $version present"
        return 0
    fi
    if ! apt-cache madison qemu-block-extra | grep -qF "$version"; then
        if [[ $version == *bpo12* && ! -e /etc/apt/sources.list.d/bookworm-backports.sources ]]; then
            echo "install-peers: adding the bookworm-backports suite for qemu-block-extra $version"
            "${sudo[@]}" tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'EOS'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
        fi
        "${sudo[@]}" apt-get update
    fi
    local before
    before=$(qemu-img --version | head -n 1)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-remove "qemu-block-extra=$version"
    if [[ $(qemu-img --version | head -n 1) != "$before" ]]; then
        echo "install-peers: qemu-img changed version ($before)" >&2
        return 1
    fi
}

# Prints each command that is missing (or, for nbdsh, does not work).
missing_commands() {
    local cmd
    for cmd in "${commands[@]}"; do
        # Daemons (nginx) live in /usr/sbin, which a user's PATH may lack.
        if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1; then
            printf '%s\n' "$cmd"
        elif [[ $cmd == nbdsh ]] && ! PATH="/usr/bin:$PATH" nbdsh --version >/dev/null 2>&1; then
            # nbdsh runs `python3 -m nbd`; the bindings live in the system
            # Python (the test harness puts /usr/bin first on PATH for it).
            printf '%s\n' "nbdsh(python3-cannot-import-nbd)"
        fi
    done
    [[ -e /usr/include/rbd/librbd.h ]] || printf '%s\n' "librbd.h(librbd-dev)"
}

sudo=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
fi

imageio_version=2.5.1

has_imageio() {
    python3 -c 'import ovirt_imageio._internal.blkhash' >/dev/null 2>&1
}

# ovirt-imageio for python3, unless it imports already. Debian's own
# python3 refuses pip installs (PEP 668) unless told otherwise; another
# python3 (pyenv, a virtualenv) takes them as they are.
install_imageio() {
    if has_imageio; then
        echo "install-peers: ovirt-imageio present"
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        echo "install-peers: python3 not found; cannot install ovirt-imageio" >&2
        return 1
    fi
    local need=()
    python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
    command -v gcc >/dev/null 2>&1 || need+=(gcc)
    python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || need+=(python3-dev)
    if ((${#need[@]} != 0)); then
        echo "install-peers: installing ${need[*]} for ovirt-imageio"
        "${sudo[@]}" apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
    fi
    local flags=()
    if python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
        flags+=(--break-system-packages)
    fi
    # The interpreter itself (sudo may reset PATH), as root only when its
    # site-packages is not the user's to write.
    local python as=()
    python=$(python3 -c 'import sys; print(sys.executable)')
    python3 -c 'import os, sys, sysconfig
sys.exit(not os.access(sysconfig.get_path("purelib"), os.W_OK))' || as=("${sudo[@]}")
    echo "install-peers: installing ovirt-imageio $imageio_version for $python"
    "${as[@]}" "$python" -m pip install --quiet "${flags[@]}" "ovirt-imageio==$imageio_version"
    if ! has_imageio; then
        echo "install-peers: python3 still cannot import ovirt_imageio" >&2
        return 1
    fi
}

mapfile -t missing < <(missing_commands)
if ((${#missing[@]} == 0)); then
    echo "install-peers: all peers present (${commands[*]})"
    install_imageio
    if $bench; then install_qemu_rbd; fi
    exit 0
fi

echo "install-peers: missing ${missing[*]}; installing ${packages[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-peers: apt-get not found; install ${packages[*]} (or equivalents) by hand" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 && ${#sudo[@]} -eq 0 ]]; then
    echo "install-peers: not root and sudo not found; cannot install ${packages[*]}" >&2
    exit 1
fi
"${sudo[@]}" apt-get update
# nbdfuse has its own package after Debian 12 (in libnbd-bin before).
if apt-cache show nbdfuse >/dev/null 2>&1; then
    packages+=(nbdfuse)
fi
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"

mapfile -t missing < <(missing_commands)
if ((${#missing[@]} != 0)); then
    echo "install-peers: still missing after installation: ${missing[*]}" >&2
    exit 1
fi
echo "install-peers: all peers present (${commands[*]})"
install_imageio
if $bench; then install_qemu_rbd; fi
