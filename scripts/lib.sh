# Shared by scripts/serve and scripts/test: checks prerequisites and keeps .venv current.
# shellcheck shell=bash

die() { echo "error: $*" >&2; exit 1; }

ensure_prereqs() {
    command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
    command -v python3 >/dev/null || die "python3 not found: install Python 3.11 (apt-get install python3 python3-venv)"
    if ! command -v curl >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq curl >/dev/null
        else
            die "curl not found: apt-get install curl"
        fi
    fi
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
