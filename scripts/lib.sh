# Shared by scripts/serve and scripts/test: checks prerequisites and keeps .venv current.
# shellcheck shell=bash

die() { echo "error: $*" >&2; exit 1; }

# System packages: curl (shell bootstraps in tests), python3-venv, and what the guest kernel
# build (rootfs::kernel) and the VM tests need (binutils assembles the tiny test guests).
ensure_system_packages() {
    local need=()
    command -v curl >/dev/null || need+=(curl)
    python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
    command -v make >/dev/null || need+=(make)
    command -v gcc >/dev/null || need+=(gcc)
    command -v as >/dev/null || need+=(binutils)
    command -v flex >/dev/null || need+=(flex)
    command -v bison >/dev/null || need+=(bison)
    command -v bc >/dev/null || need+=(bc)
    command -v patch >/dev/null || need+=(patch)
    command -v xz >/dev/null || need+=(xz-utils)
    command -v cpio >/dev/null || need+=(cpio)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    [ -f /usr/include/gelf.h ] || need+=(libelf-dev)
    # Static guest binaries (crt-static) link glibc's libc.a.
    [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
    # The microVM python3.11 base image (rootfs::base).
    command -v debootstrap >/dev/null || need+=(debootstrap)
    # L2 of the chunked image cache: the tests start their own memcached instances.
    command -v memcached >/dev/null || need+=(memcached)
    # openssl-sys (async-memcached depends on toxiproxy_rust -> reqwest 0.11 -> native-tls).
    command -v pkg-config >/dev/null || need+=(pkg-config)
    [ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
    [ ${#need[@]} -eq 0 ] && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing ${need[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        die "missing system packages: apt-get install ${need[*]}"
    fi
}

ensure_prereqs() {
    command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
    command -v python3 >/dev/null || die "python3 not found: install Python 3.11 (apt-get install python3 python3-venv)"
    ensure_system_packages
    local v
    v=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$v" = "3.11" ] || echo "warning: python3 is $v; python3.11 functions will run on it" >&2
}

# ensure_venv REQUIREMENTS...: .venv with those requirements, rebuilt when they change.
ensure_venv() {
    local stamp=.venv/.kindling-requirements
    local want
    want=$(cat "$@" | sha256sum | cut -d' ' -f1)
    if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    echo "==> preparing .venv (awslambdaric and friends)" >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv || die "python3 -m venv failed: apt-get install python3-venv"
    local args=()
    for r in "$@"; do args+=(-r "$r"); done
    .venv/bin/pip install -q --disable-pip-version-check "${args[@]}"
    echo "$want" > "$stamp"
}
