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
#   qemu-img, qemu-nbd,  qemu-utils
#   qemu-io
#   openssl              openssl (makes the keys and certificates of the
#                        TLS key tests, tests/tests/tls_keys.rs)
set -euo pipefail

commands=(nbdkit nbdinfo nbdcopy nbdsh nbd-server fio qemu-img qemu-nbd qemu-io openssl)
packages=(nbdkit libnbd-bin nbd-server fio qemu-utils python3-libnbd openssl)

# Prints each command that is missing (or, for nbdsh, does not work).
missing_commands() {
    local cmd
    for cmd in "${commands[@]}"; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            printf '%s\n' "$cmd"
        elif [[ $cmd == nbdsh ]] && ! PATH="/usr/bin:$PATH" nbdsh --version >/dev/null 2>&1; then
            # nbdsh runs `python3 -m nbd`; the bindings live in the system
            # Python (the test harness puts /usr/bin first on PATH for it).
            printf '%s\n' "nbdsh(python3-cannot-import-nbd)"
        fi
    done
}

mapfile -t missing < <(missing_commands)
if ((${#missing[@]} == 0)); then
    echo "install-peers: all peers present (${commands[*]})"
    exit 0
fi

echo "install-peers: missing ${missing[*]}; installing ${packages[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-peers: apt-get not found; install ${packages[*]} (or equivalents) by hand" >&2
    exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "install-peers: not root and sudo not found; cannot install ${packages[*]}" >&2
        exit 1
    fi
fi
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"

mapfile -t missing < <(missing_commands)
if ((${#missing[@]} != 0)); then
    echo "install-peers: still missing after installation: ${missing[*]}" >&2
    exit 1
fi
echo "install-peers: all peers present (${commands[*]})"
