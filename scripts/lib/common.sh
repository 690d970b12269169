# Shared by scripts/demo and scripts/test: locating the toolchain and installing what is missing.
# Source it; it defines functions only.

# Installs the Debian packages named, if any is missing (apt-get update once, first).
ensure_packages() {
    local missing=()
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Puts swift on PATH (it lives in /opt/swift on the project's machines; Debian 12 has no Swift 6).
ensure_swift() {
    if ! command -v swift >/dev/null 2>&1; then
        for candidate in /opt/swift/usr/bin /opt/swift/bin /usr/share/swift/usr/bin; do
            [ -x "$candidate/swift" ] && export PATH="$candidate:$PATH" && break
        done
    fi
    if ! command -v swift >/dev/null 2>&1; then
        echo "error: Swift 6 is needed and was not found (install a Swift 6 toolchain from swift.org into /opt/swift)" >&2
        exit 1
    fi
}

# The packages Berth's scripts use: build tools and the programs tests and benchmarks talk to.
# chromium (headless: the stats page test) and prometheus (promtool: the /metrics test).
BERTH_PACKAGES=(build-essential pkg-config libssl-dev curl util-linux procps iproute2 iptables haproxy etcd-server etcd-client docker.io busybox-static chromium prometheus nginx-light)
